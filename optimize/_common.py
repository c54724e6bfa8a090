"""What every graph pass shares: the result it returns and how it reads an MoE layer.

A pass takes an ``onnx_ir.Model``, rewrites it in place and returns a :class:`PassResult`
saying what it changed (``count``) and, for every place it left alone, why (``skipped``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from moetrt.ops.sparse_moe import SPEC as SPARSE_MOE
from moetrt.ops.topk_routing import SPEC as TOPK_ROUTING
from moetrt.ops._onnx import DOMAIN
from moetrt.ops._spec import OpSpec

__all__ = [
    "PassResult", "MoELayer", "read_moe_layer", "refusal", "ORT_DOMAIN", "FLOAT_TYPES", "remove_dead_code",
    "load_model", "save_model", "lazy_tensor", "SharedResult",
]

ORT_DOMAIN = "com.microsoft"
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


@dataclass
class PassResult:
    """What one pass did: ``count`` rewrites, and why each place it did not rewrite was left alone."""

    name: str
    count: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # node name -> reason
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "count": self.count}
        if self.skipped:
            out["skipped"] = dict(self.skipped)
        if self.details:
            out["details"] = self.details
        return out

    def __str__(self) -> str:
        skipped = f", {len(self.skipped)} left as they were" if self.skipped else ""
        return f"{self.name}: {self.count} rewritten{skipped}"


# --- loading and saving: weights stay on disk until written ------------------------------------------
def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model; its external weights stay on disk (memory-mapped only when a pass reads them)."""
    return ir.load(path)


def save_model(model: ir.Model, path: str | os.PathLike, external_data: bool,
               progress: Callable[[int, int], None] | None = None) -> None:
    """Save ``model``, weights in ``model.onnx.data`` beside it when ``external_data``.

    Weights are written one at a time: an untouched external weight is copied file to file,
    a rewritten one (a :func:`lazy_tensor`) is computed just before it is written and dropped
    after, so saving needs memory for one weight, not for the model. ``progress(done, total)``
    is called with bytes before each weight.
    """
    if not external_data:
        ir.save(model, path)
        return
    total = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    done = [0]

    def callback(tensor, _info) -> None:
        if progress is not None:
            progress(done[0], total)
        done[0] += tensor.nbytes

    ir.save(model, path, external_data=os.path.basename(str(path)) + ".data", callback=callback)


def _release(tensor: ir.TensorProtocol) -> None:
    """Unmap an external tensor's file (its pages count towards resident memory while mapped)."""
    if isinstance(tensor, ir.ExternalTensor):
        with contextlib.suppress(BufferError):  # a view of it is still alive: it stays mapped
            tensor.release()


def lazy_tensor(compute: Callable[[], np.ndarray], dtype: ir.DataType, shape: Sequence[int], name: str | None = None,
                sources: Sequence[ir.TensorProtocol] = ()) -> ir.LazyTensor:
    """A weight computed from ``sources`` only when it is saved (or read), then dropped.

    Passes that rewrite weights return these, so a rewritten model holds no new weight in
    memory: ``save_model`` evaluates them one at a time. ``compute`` returns the array; the
    sources' memory maps are closed after it.
    """

    def evaluate() -> ir.TensorProtocol:
        try:
            array = compute()
        finally:
            for source in sources:
                _release(source)
        assert tuple(array.shape) == tuple(shape), (name, array.shape, shape)
        return ir.tensor(array, dtype=dtype, name=name)

    return ir.LazyTensor(evaluate, dtype=dtype, shape=ir.Shape(list(shape)), name=name)


class SharedResult:
    """One computation whose outputs several lazy tensors take (a weight and its scales).

    Computed on the first take, kept until each of the ``parts`` outputs has been taken once,
    then dropped; a later take computes it again.
    """

    def __init__(self, compute: Callable[[], tuple[np.ndarray, ...]], parts: int):
        self.compute, self.parts = compute, parts
        self._result: tuple[np.ndarray, ...] | None = None
        self._taken: set[int] = set()

    def take(self, index: int) -> np.ndarray:
        if self._result is None or index in self._taken:
            self._result, self._taken = self.compute(), set()
        out = self._result[index]
        self._taken.add(index)
        if len(self._taken) == self.parts:
            self._result, self._taken = None, set()
        return out


# --- MoE layers --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MoELayer:
    """One ``moetrt::TopKRouting`` -> ``moetrt::SparseMoE`` pair, read from the graph.

    The expert weights (and biases, where the layer has them) are the initializers' tensors,
    read only when ``w_gate_up`` / ``w_down`` / ``b_gate_up`` / ``b_down`` are: a pass that
    rewrites them wraps the read in a :func:`lazy_tensor`. The attributes of both nodes are
    resolved against the ops' specs (every attribute present, defaults filled in).
    """

    router: ir.Node  # TopKRouting
    experts: ir.Node  # SparseMoE
    logits: ir.Value  # [T, E] float32
    x: ir.Value  # [T, D]
    w_gate_up_tensor: ir.TensorProtocol  # [E, 2F, D], gate rows then up rows
    w_down_tensor: ir.TensorProtocol  # [E, D, F]
    b_gate_up_tensor: ir.TensorProtocol | None  # [E, 2F], gate biases then up biases; None: no bias
    b_down_tensor: ir.TensorProtocol | None  # [E, D]; None: no bias
    router_attributes: dict[str, Any]  # TopKRouting's, resolved against its spec
    expert_attributes: dict[str, Any]  # SparseMoE's, resolved against its spec

    @property
    def k(self) -> int:
        return self.router_attributes["k"]

    @property
    def scoring(self) -> str:
        return self.router_attributes["scoring"]

    @property
    def normalize(self) -> int:
        """TopKRouting's normalize: 0 none, 1 divided by the sum, 2 by the Euclidean norm."""
        return int(self.router_attributes["normalize"])

    @property
    def scale(self) -> float:
        return self.router_attributes["scale"]

    @property
    def activation(self) -> str:
        return self.expert_attributes["activation"]

    @property
    def w_gate_up(self) -> np.ndarray:  # [E, 2F, D]
        return self.w_gate_up_tensor.numpy()

    @property
    def w_down(self) -> np.ndarray:  # [E, D, F]
        return self.w_down_tensor.numpy()

    @property
    def b_gate_up(self) -> np.ndarray | None:  # [E, 2F]
        return None if self.b_gate_up_tensor is None else self.b_gate_up_tensor.numpy()

    @property
    def b_down(self) -> np.ndarray | None:  # [E, D]
        return None if self.b_down_tensor is None else self.b_down_tensor.numpy()

    @property
    def num_experts(self) -> int:
        return self.w_gate_up_tensor.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.w_gate_up_tensor.shape[2]

    @property
    def ffn_size(self) -> int:
        return self.w_down_tensor.shape[2]

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert's weights (gate, up and down)."""
        itemsize = self.w_gate_up_tensor.dtype.itemsize
        return 3 * self.ffn_size * self.hidden_size * itemsize

    @property
    def name(self) -> str:
        return self.experts.name or "SparseMoE"


# the SparseMoE inputs a MoELayer holds; an input the spec gains later is refused until it is read here
_LAYER_INPUTS = ("x", "weights", "indices", "w_gate_up", "w_down", "b_gate_up", "b_down")


def read_moe_layer(experts: ir.Node) -> MoELayer | str:
    """The MoE layer whose ``moetrt::SparseMoE`` node is ``experts``, or why it cannot be read.

    Lowering needs the router's logits (the fused ops route themselves), so the routing weights
    and indices must both come from one ``moetrt::TopKRouting``; the expert weights and the
    optional biases must be constant initializers of the shapes the spec gives; and both nodes'
    attributes must be ones their specs declare, with allowed values (an attribute no spec
    declares is refused, never ignored).
    """
    if experts.domain != DOMAIN or experts.op_type != "SparseMoE":
        return f"{experts.op_type} is not a moetrt::SparseMoE node"
    ports = SPARSE_MOE.input_names
    if len(experts.inputs) > len(ports):
        return f"it has {len(experts.inputs)} inputs; moetrt::SparseMoE takes at most {len(ports)} ({', '.join(ports)})"
    inputs = dict(zip(ports, list(experts.inputs) + [None] * len(ports)))
    unread = [name for name, value in inputs.items() if value is not None and name not in _LAYER_INPUTS]
    if unread:
        return f"it has input(s) {unread}, which the passes do not read (they read {', '.join(_LAYER_INPUTS)})"
    weights, indices = inputs["weights"], inputs["indices"]
    router = weights.producer() if weights is not None else None
    if router is None or router.domain != DOMAIN or router.op_type != "TopKRouting":
        return "its routing weights do not come from a moetrt::TopKRouting node"
    if indices is None or indices.producer() is not router or list(router.outputs) != [weights, indices]:
        return "its routing weights and indices do not come from the same TopKRouting node"
    attributes = []
    for node, spec in ((router, TOPK_ROUTING), (experts, SPARSE_MOE)):
        try:
            attributes.append(spec.read_ir_attributes(node))
        except (ValueError, TypeError) as exc:  # TypeError: an attribute of the wrong ONNX type
            return f"its {spec.name} node's attributes do not match the op's spec: {exc}"
    optional = {port.name for port in SPARSE_MOE.inputs if port.optional}
    tensors = {}
    for what in ("w_gate_up", "w_down", "b_gate_up", "b_down"):
        value = inputs[what]
        if value is None and what in optional:
            tensors[what] = None
        elif value is None or value.const_value is None:
            return f"its {what} is not a constant initializer"
        else:
            tensors[what] = value.const_value
    num_experts, two_f, dim = tensors["w_gate_up"].shape
    for what, want in (("b_gate_up", (num_experts, two_f)), ("b_down", (num_experts, dim))):
        if tensors[what] is not None and tuple(tensors[what].shape) != want:
            return f"its {what} has shape {list(tensors[what].shape)}, expected {list(want)} ([E, 2F] / [E, D])"
    return MoELayer(
        router=router, experts=experts, logits=router.inputs[0], x=inputs["x"],
        w_gate_up_tensor=tensors["w_gate_up"], w_down_tensor=tensors["w_down"],
        b_gate_up_tensor=tensors["b_gate_up"], b_down_tensor=tensors["b_down"],
        router_attributes=attributes[0], expert_attributes=attributes[1],
    )


def refusal(spec: OpSpec, values: Mapping[str, Any], implements: Mapping[str, tuple[Any, ...]], what: str,
            why: Mapping[str, str] | None = None) -> str | None:
    """Why the lowering ``what`` refuses a node with attribute ``values`` (``spec.unsupported``), or None.

    ``why`` explains, per attribute, why the lowering's target cannot take other values; where the
    refused attribute has an explanation, the reason is ``"<name> <value>: <why>"``.
    """
    reason = spec.unsupported(values, implements, what)
    if reason is None:
        return None
    resolved = spec.resolve(values)
    for name, note in (why or {}).items():
        # is ``name`` refused on its own (every other attribute accepted as it is)?
        others = {a.name: (resolved[a.name],) for a in spec.attrs if a.name != name}
        alone = {**others, **({name: implements[name]} if name in implements else {})}
        if spec.unsupported(values, alone, what) is not None:
            value = resolved[name]
            return f"{name} {value:g}: {note}" if isinstance(value, float) else f"{name} {value!r}: {note}"
    return reason


def remove_dead_code(model: ir.Model) -> None:
    """Drop nodes, initializers, functions and opset imports nothing uses any more."""
    import onnx_ir.passes.common as common_passes

    ir.passes.Sequential(
        common_passes.RemoveUnusedNodesPass(),
        common_passes.RemoveUnusedFunctionsPass(),
        common_passes.RemoveUnusedOpsetsPass(),
    )(model)
    # RemoveUnusedOpsetsPass does not look inside subgraphs: import every domain a node uses
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in model.opset_imports:
            model.opset_imports[node.domain] = 1
