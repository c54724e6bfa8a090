"""Pass: fp32 graph -> fp16 / bf16, keeping router logits, softmax and the final logits in fp32.

The rule is torch autocast's, applied to an exported graph: every op falls in one of three
classes, and ``Cast`` nodes go in only where a value's dtype differs from what its consumer needs.

- **low precision** (:data:`LOW_PRECISION_OPS`: MatMul, Gemm, the routed experts): run in the
  target dtype; these hold the weights, so they set the bytes read per token.
- **fp32** (:data:`FP32_OPS`: softmax, the norm statistics ``Pow``/``ReduceMean``/``Sqrt``/
  ``Reciprocal``, ``Exp``/``Log``, ``Cos``/``Sin`` of the rotary angles, ``moetrt::TopKRouting``,
  and the router ``Gemm``/``MatMul`` that produces its logits): run in float32, as the reference
  model does in every dtype (RMSNorm statistics, attention softmax, router math).
- **follow** (everything else: elementwise ops, data movement): run in float32 when every
  computed float input is float32, and in the target dtype as soon as one is in the target
  dtype (so a norm's statistics stay fp32 while ``x * rsqrt(...)`` returns to the residual
  stream's dtype, and ``q * cos`` runs in the target dtype as the reference rounds cos/sin).

Constants and initializers take the dtype of the op that consumes them (fp16 values clamped
to +-65504, so an fp32 ``finfo.min`` mask becomes fp16's ``finfo.min`` rather than -inf, as
the fp16 reference builds it); a float cast of integers (positions, masks) stays float32.
Graph inputs and outputs follow the exported I/O contract of the target dtype: the KV cache in
the target dtype, ``logits`` and router outputs in float32.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir

from moetrt.dtypes import ONNX_ELEM_TYPES
from moetrt.ops._onnx import DOMAIN

from ._common import FLOAT_TYPES, PassResult, lazy_tensor, remove_dead_code

__all__ = ["convert_precision", "PRECISIONS", "FP32_OPS", "LOW_PRECISION_OPS"]

PRECISIONS = {d: ir.DataType(ONNX_ELEM_TYPES[d]) for d in ("fp16", "bf16")}  # the low precisions
FLOAT = ir.DataType.FLOAT
FP32_OPS = {
    ("", op) for op in ("Softmax", "LogSoftmax", "Pow", "ReduceMean", "ReduceSumSquare", "Sqrt", "Reciprocal",
                        "Exp", "Log", "Cos", "Sin", "Erf", "Range")
} | {(DOMAIN, "TopKRouting")}
LOW_PRECISION_OPS = {("", "MatMul"), ("", "Gemm"), (DOMAIN, "SparseMoE")}
# inputs that stay float32 whatever the op's dtype: SparseMoE's routing weights
FP32_INPUTS = {(DOMAIN, "SparseMoE"): {1}}
# ops between the router GEMM and TopKRouting that only move data
_DATA_MOVEMENT = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Transpose"}
_FP16_MAX = float(np.finfo(np.float16).max)


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in FLOAT_TYPES


def _is_constant(value: ir.Value) -> bool:
    producer = value.producer()
    return value.is_initializer() or (producer is not None and producer.op_type == "Constant" and producer.domain == "")


def _router_nodes(graph: ir.Graph) -> set[ir.Node]:
    """The router GEMM (and data movement after it) feeding each TopKRouting: they stay fp32."""
    nodes = set()
    for node in graph:
        if (node.domain, node.op_type) != (DOMAIN, "TopKRouting"):
            continue
        producer = node.inputs[0].producer()
        while producer is not None and producer.domain == "" and producer.op_type in _DATA_MOVEMENT:
            nodes.add(producer)
            producer = producer.inputs[0].producer()
        if producer is not None and producer.domain == "" and producer.op_type in ("MatMul", "Gemm"):
            nodes.add(producer)
    return nodes


def _converted(array: np.ndarray, dtype: ir.DataType) -> np.ndarray:
    if dtype == ir.DataType.FLOAT16:
        return np.clip(array, -_FP16_MAX, _FP16_MAX).astype(np.float16)
    if dtype == ir.DataType.BFLOAT16:
        import ml_dtypes  # a dependency of onnx-ir

        return array.astype(np.float32).astype(ml_dtypes.bfloat16)
    return array.astype(np.float32)


def _convert_array(array: np.ndarray, dtype: ir.DataType) -> ir.TensorProtocol:
    return ir.tensor(_converted(array, dtype), dtype=dtype)


def _convert_constant(value: ir.Value, dtype: ir.DataType) -> ir.TensorProtocol:
    """``value``'s constant in ``dtype``: an initializer converts when saved (one weight in memory at a time)."""
    source = value.const_value
    if source is not None:
        return lazy_tensor(lambda: _converted(source.numpy(), dtype), dtype, source.shape, sources=[source])
    return _convert_array(value.producer().attributes["value"].as_tensor().numpy(), dtype)


def convert_precision(
    model: ir.Model, precision: str, output_dtypes: dict[str, ir.DataType] | None = None
) -> PassResult:
    """Convert an fp32 graph to ``precision`` (fp16 | bf16) in place; returns the casts it inserted.

    ``output_dtypes``: the dtype of each float graph output (default: ``logits`` and
    ``router_*`` float32, the rest the target dtype).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    target = PRECISIONS[precision]
    graph = model.graph
    for node in graph:
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            raise ValueError(f"{node.op_type} node {node.name!r} has subgraphs: convert precision before lowering")
    floats = [v for v in list(graph.inputs) + [o for n in graph for o in n.outputs] if _is_float(v)]
    if any(v.dtype != FLOAT for v in floats):
        raise ValueError(f"convert_precision expects a float32 graph (an fp32 export), found {floats[0].dtype}")

    router = _router_nodes(graph)
    dtype_of: dict[ir.Value, ir.DataType] = {}  # computed float values -> their new dtype
    for value in graph.inputs:
        if _is_float(value):
            dtype_of[value] = target
    needs: list[tuple[ir.Node, int, ir.DataType]] = []  # (consumer, input index, dtype it needs)

    # 1. decide each node's dtype, walking in topological order
    for node in graph:
        key = (node.domain, node.op_type)
        float_inputs = [(i, v) for i, v in enumerate(node.inputs) if _is_float(v)]
        float_outputs = [v for v in node.outputs if _is_float(v)]
        if not float_inputs and not float_outputs:
            continue
        computed = {dtype_of[v] for _, v in float_inputs if v in dtype_of}
        if key == ("", "Cast"):
            if not float_inputs:  # integers to float: positions and masks stay float32
                compute = FLOAT
            else:  # a float -> float cast is a no-op in the fp32 graph: keep the input's dtype
                compute = dtype_of.get(node.inputs[0], target)
                node.attributes["to"] = ir.AttrInt64("to", compute)
        elif key in FP32_OPS or node in router:
            compute = FLOAT
        elif key in LOW_PRECISION_OPS:
            compute = target
        else:
            compute = FLOAT if computed == {FLOAT} else target
        fp32_slots = FP32_INPUTS.get(key, set())
        for i, value in float_inputs:
            needs.append((node, i, FLOAT if i in fp32_slots else compute))
        for value in float_outputs:
            # SparseMoE's output follows x; TopKRouting's weights are float32 by contract
            dtype_of[value] = compute
        for attr in node.attributes.values():  # ConstantOfShape(value=float tensor)
            if attr.type == ir.AttributeType.TENSOR and attr.value.dtype == FLOAT and node.op_type != "Constant":
                node.attributes[attr.name] = ir.AttrTensor(attr.name, _convert_array(attr.value.numpy(), compute))

    # 2. rewrite: constants take their consumers' dtype, computed values get a Cast where needed
    result = PassResult(f"convert_precision_{precision}")
    constant_uses: dict[ir.Value, list[tuple[ir.Node, int, ir.DataType]]] = defaultdict(list)
    casts: dict[tuple[ir.Value, ir.DataType], ir.Value] = {}
    for node, i, dtype in needs:
        value = node.inputs[i]
        if _is_constant(value):
            constant_uses[value].append((node, i, dtype))
        elif dtype_of[value] != dtype:
            if (value, dtype) not in casts:
                cast = ir.node("Cast", [value], attributes={"to": dtype}, name=f"{value.name}_to_{dtype.name.lower()}")
                cast.outputs[0].name = f"{value.name}.{dtype.name.lower()}"
                cast.outputs[0].type, cast.outputs[0].shape = ir.TensorType(dtype), value.shape
                if value.producer() is not None:
                    graph.insert_after(value.producer(), cast)
                else:  # a graph input
                    graph.insert_before(next(iter(graph)), cast)
                casts[(value, dtype)] = cast.outputs[0]
                result.count += 1
            node.replace_input_with(i, casts[(value, dtype)])
    converted = 0
    for value, uses in constant_uses.items():
        wanted = {dtype for _, _, dtype in uses}
        if wanted == {FLOAT}:
            continue
        copies = {}
        for dtype in wanted:
            if dtype == FLOAT:
                copies[dtype] = value
                continue
            tensor = _convert_constant(value, dtype)
            if len(wanted) == 1 and value.is_initializer():  # convert in place, keep the name
                value.const_value, value.type = tensor, ir.TensorType(dtype)
                copies[dtype] = value
            else:
                copy = ir.Value(name=f"{value.name}.{dtype.name.lower()}", type=ir.TensorType(dtype),
                                shape=value.shape, const_value=tensor)
                graph.register_initializer(copy)
                copies[dtype] = copy
            converted += 1
        for node, i, dtype in uses:
            if node.inputs[i] is not copies[dtype]:
                node.replace_input_with(i, copies[dtype])
    for value, dtype in dtype_of.items():
        value.type = ir.TensorType(dtype)

    # 3. graph outputs keep the I/O contract
    for index, value in enumerate(list(graph.outputs)):
        if not _is_float(value):
            continue
        want = (output_dtypes or {}).get(value.name)
        if want is None:
            want = FLOAT if value.name == "logits" or value.name.startswith("router_") else target
        if value.dtype == want:
            continue
        name = value.name
        value.name = f"{name}.{value.dtype.name.lower()}"
        cast = ir.node("Cast", [value], attributes={"to": want}, name=f"{name}_output_cast")
        cast.outputs[0].name, cast.outputs[0].type, cast.outputs[0].shape = name, ir.TensorType(want), value.shape
        graph.append(cast)
        graph.outputs[index] = cast.outputs[0]
        result.count += 1
    remove_dead_code(model)
    result.details = {"casts": result.count, "constants_converted": converted,
                      "fp32_nodes": sum(1 for n in graph if any(_is_float(o) and o.dtype == FLOAT for o in n.outputs))}
    return result
