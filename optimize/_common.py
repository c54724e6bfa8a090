"""What every graph pass shares: the result it returns and how it reads an MoE layer.

A pass takes an ``onnx_ir.Model``, rewrites it in place and returns a :class:`PassResult`
saying what it changed (``count``) and, for every place it left alone, why (``skipped``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from moetrt.ops._onnx import DOMAIN

__all__ = ["PassResult", "MoELayer", "read_moe_layer", "ORT_DOMAIN", "FLOAT_TYPES", "remove_dead_code"]

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


@dataclass(frozen=True)
class MoELayer:
    """One ``moetrt::TopKRouting`` -> ``moetrt::SparseMoE`` pair, read from the graph."""

    router: ir.Node  # TopKRouting
    experts: ir.Node  # SparseMoE
    logits: ir.Value  # [T, E] float32
    x: ir.Value  # [T, D]
    w_gate_up: np.ndarray  # [E, 2F, D], gate rows then up rows
    w_down: np.ndarray  # [E, D, F]
    k: int
    scoring: str
    normalize: bool
    scale: float

    @property
    def num_experts(self) -> int:
        return self.w_gate_up.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.w_gate_up.shape[2]

    @property
    def ffn_size(self) -> int:
        return self.w_down.shape[2]

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
    arrays = []
    for value, what in ((w_gate_up, "w_gate_up"), (w_down, "w_down")):
        if value is None or value.const_value is None:
            return f"its {what} is not a constant initializer"
        arrays.append(value.const_value.numpy())
    attrs = router.attributes
    return MoELayer(
        router=router, experts=experts, logits=router.inputs[0], x=x,
        w_gate_up=arrays[0], w_down=arrays[1],
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
