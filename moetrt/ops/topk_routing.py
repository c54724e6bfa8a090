"""``moetrt::TopKRouting(logits) -> (weights, indices)``: the router of an MoE layer.

Semantics (DESIGN.md, domain ``moetrt`` version 1)::

    logits  float32 [T, E]
    scores  = softmax(logits, -1)            if scoring == "softmax"
            = sigmoid(logits)                if scoring == "sigmoid"
    indices = the k largest scores per row, sorted descending, ties to the lower expert
              index (ONNX TopK's rule)                                   int32 [T, k]
    weights = scores[indices]                                            float32 [T, k]
    if normalize: weights /= weights.sum(-1)
    weights *= scale

Router math is float32 in every model dtype. Presets: Mixtral (softmax, k=2, normalize=1),
Grok-1 (softmax, k=2, normalize=0), Qwen2-MoE and OLMoE (softmax, normalize=0), Qwen3-MoE
(softmax, normalize=1).

This file holds the op's faces that need nothing but torch and numpy: the
``torch.library.custom_op`` (eager kernel, fake, autograd) and the NumPy reference. The ONNX
function body and the per-target lowerings live with the export and optimize stages and are
registered against the same name.
"""

from __future__ import annotations

import numpy as np
import torch

from moetrt.ops._spec import Attr, OpSpec, Port

__all__ = ["topk_routing", "topk_routing_reference", "routing_weights", "OP_NAME", "SCORINGS", "SPEC"]

OP_NAME = "TopKRouting"
SCORINGS = ("softmax", "sigmoid")

SPEC = OpSpec(
    name=OP_NAME, domain="moetrt", version=1, doc=__doc__,
    inputs=(Port("logits", "T", "router logits [T, E]"),),
    outputs=(Port("weights", "T", "routing weights [T, k]"), Port("indices", "I", "expert indices [T, k], best first")),
    type_constraints=(("T", ("tensor(float)",), "router math is float32"), ("I", ("tensor(int32)",), "")),
    attrs=(  # version-1 nodes carry every attribute
        Attr("k", int, None, None, "experts per token, 1..E"),
        Attr("scoring", str, "softmax", SCORINGS, "softmax | sigmoid", always=True),
        Attr("normalize", int, 0, (0, 1), "1: divide the k weights by their sum", always=True),
        Attr("scale", float, 1.0, None, "multiplies the weights last", always=True),
        Attr("plugin_namespace", str, "moetrt", ("moetrt",), "makes TensorRT's parser pick the plugin", always=True),
    ),
)
# The torch op takes k, scoring, normalize (as bool) and scale; tests/moetrt/test_op_spec.py checks
# its schema against SPEC.


def _check(logits: torch.Tensor, k: int, scoring: str) -> None:
    if logits.dim() != 2:
        raise ValueError(f"TopKRouting: logits must be [T, E], got shape {tuple(logits.shape)}")
    if logits.dtype != torch.float32:
        raise ValueError(f"TopKRouting: logits must be float32 (router math is fp32), got {logits.dtype}")
    num_experts = logits.shape[1]
    if not 1 <= k <= num_experts:
        raise ValueError(f"TopKRouting: k must be in 1..E={num_experts}, got {k}")
    SPEC.attr("scoring").coerce(scoring, OP_NAME)


def _scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    return torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)


def routing_weights(
    logits: torch.Tensor, indices: torch.Tensor, scoring: str, normalize: bool, scale: float
) -> torch.Tensor:
    """Weights of the chosen experts, differentiable in ``logits`` (indices fixed)."""
    weights = _scores(logits, scoring).gather(-1, indices.long())  # [T, K]
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * scale


@torch.library.custom_op("moetrt::TopKRouting", mutates_args=())
def topk_routing(
    logits: torch.Tensor, k: int, scoring: str = "softmax", normalize: bool = False, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route each token to its ``k`` best experts; returns ``(weights f32 [T,k], indices i32 [T,k])``."""
    _check(logits, k, scoring)
    scores = _scores(logits, scoring)  # [T, E]
    # A stable descending sort keeps equal scores in expert order, so ties go to the lower
    # index; torch.topk gives no such guarantee.
    indices = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]  # [T, K]
    weights = routing_weights(logits, indices, scoring, normalize, scale)
    return weights.contiguous(), indices.to(torch.int32).contiguous()


@topk_routing.register_fake
def _(logits, k, scoring="softmax", normalize=False, scale=1.0):
    _check(logits, k, scoring)
    num_tokens = logits.shape[0]
    return logits.new_empty(num_tokens, k), logits.new_empty(num_tokens, k, dtype=torch.int32)


def _setup_context(ctx, inputs, output):
    logits, _k, scoring, normalize, scale = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.options = (scoring, normalize, scale)


def _backward(ctx, grad_weights, _grad_indices):
    logits, indices = ctx.saved_tensors
    with torch.enable_grad():
        leaf = logits.detach().requires_grad_()
        weights = routing_weights(leaf, indices, *ctx.options)
        (grad_logits,) = torch.autograd.grad(weights, leaf, grad_weights)
    return grad_logits, None, None, None, None


topk_routing.register_autograd(_backward, setup_context=_setup_context)


def topk_routing_reference(
    logits: np.ndarray, k: int, scoring: str = "softmax", normalize: bool = False, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """NumPy reference of the op, computed in float64 and returned as (float32, int32)."""
    SPEC.attr("scoring").coerce(scoring, OP_NAME)
    logits = np.asarray(logits, dtype=np.float64)
    if scoring == "softmax":
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        scores = shifted / shifted.sum(axis=-1, keepdims=True)
    else:  # sigmoid
        scores = 1.0 / (1.0 + np.exp(-logits))
    # float32 scores decide ties, as the op does; stable sort of the negation keeps lower index first
    order = np.argsort(-scores.astype(np.float32), axis=-1, kind="stable")[:, :k]
    weights = np.take_along_axis(scores, order, axis=-1)
    if normalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return (weights * scale).astype(np.float32), order.astype(np.int32)


# --- ONNX face ---------------------------------------------------------------------------------
def onnx_schema():
    """The ``OpSchema`` of ``moetrt::TopKRouting`` (version 1), registered only while exporting."""
    return SPEC.onnx_schema()


def onnx_function(opset: int):
    """The model-local ``FunctionProto``: the op in standard ONNX ops, honouring every attribute."""
    from moetrt.ops._onnx import BOOL, INT32, Body, make_function

    b = Body("tkr_")
    softmax = b.op("Softmax", "logits", axis=-1)  # [T, E]
    # 1 / (1 + exp(-x)) rather than Sigmoid: ONNX Runtime's CPU Sigmoid is exact to ~1e-7 absolute but
    # only ~2e-4 relative below x = -4, and normalizing divides those small scores by their small sum
    one = b.const(1.0, dtype=np.float32)
    sigmoid = b.op("Reciprocal", b.op("Add", one, b.op("Exp", b.op("Neg", "logits"))))  # [T, E]
    use_sigmoid = b.op("Equal", b.attr_const("scoring", "string"), b.const("sigmoid", dtype=object))
    scores = b.op("Where", use_sigmoid, sigmoid, softmax)  # [T, E]
    k = b.op("Reshape", b.attr_const("k", "int"), b.const([1]))  # [1]
    # ONNX TopK: sorted descending, equal values keep the lower index first
    top, top_idx = b.op("TopK", scores, k, axis=-1, largest=1, sorted=1, outputs=2)  # [T, K] x2
    normalize = b.op("Cast", b.attr_const("normalize", "int"), to=BOOL)
    normed = b.op("Div", top, b.op("ReduceSum", top, b.const([-1]), keepdims=1))
    weights = b.op("Mul", b.op("Where", normalize, normed, top), b.attr_const("scale", "float"))
    b.rename_output(weights, "weights")
    b.rename_output(b.op("Cast", top_idx, to=INT32), "indices")
    return make_function(
        OP_NAME, b, ["logits"], ["weights", "indices"], opset,
        attributes=[a.name for a in SPEC.attrs if a.required],
        attribute_defaults=SPEC.defaults,
        doc="moetrt::TopKRouting in standard ONNX ops",
    )
