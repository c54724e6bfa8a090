"""What every graph pass shares: the result it returns and how it reads an MoE layer.

A pass takes an ``onnx_ir.Model``, rewrites it in place and returns a :class:`PassResult`
saying what it changed (``count``) and, for every place it left alone, why (``skipped``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from moetrt.ops._onnx import DOMAIN

__all__ = [
    "PassResult", "MoELayer", "read_moe_layer", "ORT_DOMAIN", "FLOAT_TYPES", "remove_dead_code", "load_model",
    "save_model", "lazy_tensor", "SharedResult",
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

    The expert weights are the initializers' tensors, read only when ``w_gate_up`` / ``w_down``
    are: a pass that rewrites them wraps the read in a :func:`lazy_tensor`.
    """

    router: ir.Node  # TopKRouting
    experts: ir.Node  # SparseMoE
    logits: ir.Value  # [T, E] float32
    x: ir.Value  # [T, D]
    w_gate_up_tensor: ir.TensorProtocol  # [E, 2F, D], gate rows then up rows
    w_down_tensor: ir.TensorProtocol  # [E, D, F]
    k: int
    scoring: str
    normalize: bool
    scale: float

    @property
    def w_gate_up(self) -> np.ndarray:  # [E, 2F, D]
        return self.w_gate_up_tensor.numpy()

    @property
    def w_down(self) -> np.ndarray:  # [E, D, F]
        return self.w_down_tensor.numpy()

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


def read_moe_layer(experts: ir.Node) -> MoELayer | str:
    """The MoE layer whose ``moetrt::SparseMoE`` node is ``experts``, or why it cannot be read.

    Lowering needs the router's logits (the fused ops route themselves), so the routing weights
    and indices must both come from one ``moetrt::TopKRouting``, and the expert weights must be
    constant initializers.
    """
    if experts.domain != DOMAIN or experts.op_type != "SparseMoE":
        return f"{experts.op_type} is not a moetrt::SparseMoE node"
    x, weights, indices, w_gate_up, w_down = (list(experts.inputs) + [None] * 5)[:5]
    router = weights.producer() if weights is not None else None
    if router is None or router.domain != DOMAIN or router.op_type != "TopKRouting":
        return "its routing weights do not come from a moetrt::TopKRouting node"
    if indices is None or indices.producer() is not router or list(router.outputs) != [weights, indices]:
        return "its routing weights and indices do not come from the same TopKRouting node"
    tensors = []
    for value, what in ((w_gate_up, "w_gate_up"), (w_down, "w_down")):
        if value is None or value.const_value is None:
            return f"its {what} is not a constant initializer"
        tensors.append(value.const_value)
    attrs = router.attributes
    return MoELayer(
        router=router, experts=experts, logits=router.inputs[0], x=x,
        w_gate_up_tensor=tensors[0], w_down_tensor=tensors[1],
        k=attrs["k"].as_int(),
        scoring=attrs["scoring"].as_string() if "scoring" in attrs else "softmax",
        normalize=bool(attrs["normalize"].as_int()) if "normalize" in attrs else False,
        scale=attrs["scale"].as_float() if "scale" in attrs else 1.0,
    )


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
