"""A small builder for ONNX function bodies, shared by the op files.

Each op file describes its ONNX face with it: the ``OpSchema`` the exporter needs to emit a
node of domain ``moetrt``, and the model-local ``FunctionProto`` that lets any ONNX runtime run
the node with standard ops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DOMAIN = "moetrt"
DOMAIN_VERSION = 1
PLUGIN_NAMESPACE = "moetrt"


class Body:
    """Collects nodes with fresh value names: ``b.op("Softmax", x, axis=-1)`` returns the output name."""

    def __init__(self, prefix: str = ""):
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0
        self._prefix = prefix

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self._prefix}{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, name: str | None = None, **attrs):
        outs = [self.fresh(name or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if outputs == 1 else outs

    def const(self, value, dtype=np.int64, name: str = "const") -> str:
        array = np.asarray(value, dtype=dtype)
        out = self.fresh(name)
        self.nodes.append(helper.make_node("Constant", [], [out], value=numpy_helper.from_array(array, out)))
        return out

    def attr_const(self, attr: str, kind: str) -> str:
        """A Constant whose value is the calling node's attribute ``attr`` (``kind``: int|float|string)."""
        out = self.fresh(attr)
        node = helper.make_node("Constant", [], [out])
        types = {"int": onnx.AttributeProto.INT, "float": onnx.AttributeProto.FLOAT, "string": onnx.AttributeProto.STRING}
        ref = onnx.AttributeProto(name=f"value_{kind}", ref_attr_name=attr, type=types[kind])
        node.attribute.append(ref)
        self.nodes.append(node)
        return out

    def rename_output(self, old: str, new: str) -> None:
        for node in self.nodes:
            node.output[:] = [new if o == old else o for o in node.output]
            node.input[:] = [new if i == old else i for i in node.input]

    def graph(self, name: str, outputs: Sequence[str]) -> onnx.GraphProto:
        """A subgraph (If branch) returning ``outputs``; types are left to inference."""
        return helper.make_graph(self.nodes, name, [], [onnx.ValueInfoProto(name=o) for o in outputs])


def make_function(
    name: str,
    body: Body,
    inputs: Sequence[str],
    outputs: Sequence[str],
    opset: int,
    attributes: Sequence[str] = (),
    attribute_defaults: dict[str, object] | None = None,
    doc: str = "",
    overload: str = "",
) -> onnx.FunctionProto:
    """A function of domain moetrt; ``overload`` (IR version 10) tells variants of one op apart."""
    defaults = [helper.make_attribute(k, v) for k, v in (attribute_defaults or {}).items()]
    fn = helper.make_function(
        DOMAIN, name, list(inputs), list(outputs), body.nodes,
        [helper.make_opsetid("", opset)], list(attributes), attribute_protos=defaults, doc_string=doc,
        overload=overload or None,
    )
    return fn


@contextlib.contextmanager
def registered_schemas(schemas: Sequence[onnx.defs.OpSchema]) -> Iterator[None]:
    """Register ``schemas`` with onnx for the duration of an export (so the exporter can emit them);
    one op may come in several versions (``TopKRouting`` 1 and 2)."""
    added = []
    try:
        for schema in schemas:
            version = schema.since_version
            if not (onnx.defs.has(schema.name, version, schema.domain) and onnx.defs.get_schema(
                    schema.name, version, schema.domain).since_version == version):
                onnx.defs.register_schema(schema)
                added.append(schema)
        yield
    finally:
        for schema in added:
            onnx.defs.deregister_schema(schema.name, schema.since_version, schema.domain)


INT64 = TensorProto.INT64
INT32 = TensorProto.INT32
FLOAT = TensorProto.FLOAT
BOOL = TensorProto.BOOL
