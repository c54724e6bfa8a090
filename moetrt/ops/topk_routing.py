"""``moetrt::TopKRouting(logits[, selection_bias]) -> (weights, indices)``: the router of an MoE layer.

Semantics (DESIGN.md, domain ``moetrt``)::

    logits  float32 [T, E]
    scores  = softmax(logits, -1)            if scoring == "softmax"
            = sigmoid(logits)                if scoring == "sigmoid"
    sel     = scores + selection_bias        (version 2: optional input, float32 [E]; else sel = scores)
    if n_group > 1:                          (version 2: attributes n_group, topk_group, group_scoring)
        the experts form n_group groups of E / n_group consecutive experts; a group's score is
        the sum of its two largest sel ("top2_sum", DeepSeek-V3) or its largest sel ("max",
        DeepSeek-V2); the topk_group best groups are kept (ties to the lower group index) and
        sel of every expert in another group becomes -inf
    indices = the k largest sel per row, sorted descending, ties to the lower expert
              index (ONNX TopK's rule)                                   int32 [T, k]
    weights = scores[indices]  (the unbiased scores)                     float32 [T, k]
    if normalize == 1: weights /= max(weights.sum(-1), norm_min)   (the 1-norm: the weights are >= 0;
                                         version 3: attribute norm_min, default 0: the plain sum)
    if normalize == 2: weights /= sqrt((weights ** 2).sum(-1))    (the Euclidean norm, DBRX)
    weights *= scale

    scoring == "sparsemixer" (version 4; PhiMoE, transformers' ``sparsemixer`` in eval mode; k = 2,
    no selection bias, no groups; attribute jitter_eps, eps below):
        i1 = argmax(logits) (the lower index among equals)      m1 = logits[i1]
        masked1 = logits, -inf where (m1 - logits) / max(|logits|, m1) > 2 eps
        w1 = softmax(masked1)[i1]
        rest = logits with rest[i1] = -inf
        i2 = argmax(rest)                                       m2 = rest[i2]
        masked2 = rest, -inf where (m2 - logits) / max(|logits|, m2) > 2 eps
        w2 = softmax(masked2)[i2]
        indices = [i1, i2], weights = [w1, w2], then normalize and scale as above

Router math is float32 in every model dtype. Presets: Mixtral (softmax, k=2, normalize=1),
Grok-1 (softmax, k=2, normalize=0), Qwen2-MoE and OLMoE (softmax, normalize=0), Qwen3-MoE
(softmax, normalize=1); DeepSeek-V3 / Kimi-K2 / GLM-4.5 (sigmoid, selection bias, groups with
top2_sum), MiniMax-M2 (sigmoid, selection bias, no groups); ERNIE-4.5-MoE (softmax, selection
bias, normalize with norm_min = moe_norm_min); DBRX (softmax, normalize the p of its
``moe_normalize_expert_weights``: 1 as released, 2 where a config says so).

Versions: a node that passes a selection bias or carries a group attribute needs domain
``moetrt`` version 2, one that carries ``norm_min`` version 3, a sparsemixer node version 4; a model
whose nodes use none keeps importing version 1 and exports exactly as before.

This file holds all the op's faces: the ``torch.library.custom_op`` (eager kernel, fake,
autograd), the NumPy reference, the ONNX schema and the model-local function body.
"""

from __future__ import annotations

import numpy as np
import torch

from moetrt.ops._spec import Attr, OpSpec, Port

__all__ = [
    "topk_routing", "topk_routing_reference", "routing_weights", "selection_scores", "check_routing",
    "OP_NAME", "SCORINGS", "GROUP_SCORINGS", "SPEC", "TORCH_ARGS", "RoutingVariant", "onnx_variant",
    "sparsemixer", "sparsemixer_reference",
]

OP_NAME = "TopKRouting"
# sparsemixer: PhiMoE's top-2 with jitter-eps masking (version 3; the module docstring)
SCORINGS = ("softmax", "sigmoid", "sparsemixer")
# a group's score for group-limited routing: the sum of its two best selection scores (DeepSeek-V3)
# or its best one (DeepSeek-V2)
GROUP_SCORINGS = ("top2_sum", "max")

SPEC = OpSpec(
    name=OP_NAME, domain="moetrt", version=4, doc=__doc__,
    inputs=(
        Port("logits", "T", "router logits [T, E]"),
        Port("selection_bias", "T", "[E] added to the scores for choosing only", optional=True, since=2),
    ),
    outputs=(Port("weights", "T", "routing weights [T, k]"), Port("indices", "I", "expert indices [T, k], best first")),
    type_constraints=(("T", ("tensor(float)",), "router math is float32"), ("I", ("tensor(int32)",), "")),
    attrs=(  # version-1 nodes carry every version-1 attribute; version-2 ones only where not default
        Attr("k", int, None, None, "experts per token, 1..E"),
        Attr("scoring", str, "softmax", SCORINGS, "softmax | sigmoid | sparsemixer", always=True,
             since_values={"sparsemixer": 4}),
        Attr("normalize", int, 0, (0, 1, 2), "the p-norm the k weights are divided by: 0 none, 1 their sum, 2 the "
             "Euclidean norm", always=True),
        Attr("scale", float, 1.0, None, "multiplies the weights last", always=True),
        Attr("n_group", int, 1, None, "groups of experts, a divisor of E (1: no groups)", since=2),
        Attr("topk_group", int, 1, None, "groups a token may choose from, 1..n_group", since=2),
        Attr("group_scoring", str, "top2_sum", GROUP_SCORINGS, "with n_group > 1, a group's score: top2_sum | max",
             since=2),
        Attr("plugin_namespace", str, "moetrt", ("moetrt",), "makes TensorRT's parser pick the plugin", always=True),
        Attr("norm_min", float, 0.0, None, "with normalize, the k weights are divided by max(their sum, norm_min)",
             only_with={"normalize": (1,)}, since=3),
        Attr("jitter_eps", float, 0.01, None, "sparsemixer: experts within a relative 2 * jitter_eps of the best "
             "share its softmax", only_with={"scoring": ("sparsemixer",)}, since=4),
    ),
)
# the torch op's arguments after logits, in order: the version-1 ones positionally as callers always
# passed them, then the version-2, -3 and -4 ones (keywords); plugin_namespace is for TensorRT only
TORCH_ARGS = ("k", "scoring", "normalize", "scale", "selection_bias", "n_group", "topk_group", "group_scoring",
              "norm_min", "jitter_eps")
TORCH_KINDS: dict[str, str] = {}  # the spec's kinds (normalize: an int 0/1/2; callers' True/False are 1/0)


def check_routing(num_experts: int, k: int, scoring: str = "softmax", n_group: int = 1, topk_group: int = 1,
                  group_scoring: str = "top2_sum", norm_min: float = 0.0, jitter_eps: float = 0.01) -> None:
    """ValueError naming the attribute and what it takes, for attribute values no node may have."""
    if not 1 <= k <= num_experts:
        raise ValueError(f"{OP_NAME}: k must be in 1..E={num_experts}, got {k}")
    if not (isinstance(norm_min, (int, float)) and not isinstance(norm_min, bool) and 0.0 <= norm_min < float("inf")):
        raise ValueError(f"{OP_NAME}: attribute 'norm_min' must be a finite float >= 0 (0: divide by the plain sum), "
                         f"got {norm_min!r}")
    SPEC.attr("scoring").coerce(scoring, OP_NAME)
    if scoring == "sparsemixer":
        if k != 2:
            raise ValueError(f"{OP_NAME}: scoring 'sparsemixer' routes to exactly k=2 experts, got k={k}")
        if n_group != 1:
            raise ValueError(f"{OP_NAME}: scoring 'sparsemixer' takes no groups, got n_group={n_group}")
        eps = SPEC.attr("jitter_eps").coerce(jitter_eps, OP_NAME)
        if not 0.0 <= eps < float("inf"):
            raise ValueError(f"{OP_NAME}: attribute 'jitter_eps' must be a finite number >= 0, got {jitter_eps!r}")
    SPEC.attr("group_scoring").coerce(group_scoring, OP_NAME)
    for name, value in (("n_group", n_group), ("topk_group", topk_group)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{OP_NAME}: attribute {name!r} must be a positive int (n_group 1: no groups), got {value!r}")
    if num_experts % n_group:
        raise ValueError(f"{OP_NAME}: n_group ({n_group}) must divide the expert count E={num_experts}")
    if topk_group > n_group:
        raise ValueError(f"{OP_NAME}: topk_group must be in 1..n_group={n_group}, got {topk_group}")
    size = num_experts // n_group
    if n_group > 1 and group_scoring == "top2_sum" and size < 2:
        raise ValueError(f"{OP_NAME}: group_scoring 'top2_sum' needs groups of >= 2 experts, got E={num_experts} / "
                         f"n_group={n_group} = {size}; use group_scoring 'max' or fewer groups")
    if k > topk_group * size:
        raise ValueError(f"{OP_NAME}: k ({k}) exceeds the {topk_group * size} experts of the topk_group={topk_group} "
                         f"groups of {size} a token may choose from")


def _check(logits: torch.Tensor, k: int, scoring: str, selection_bias: torch.Tensor | None = None,
           n_group: int = 1, topk_group: int = 1, group_scoring: str = "top2_sum", norm_min: float = 0.0,
           normalize: int = 0, jitter_eps: float = 0.01) -> None:
    SPEC.attr("normalize").coerce(normalize, OP_NAME)
    if logits.dim() != 2:
        raise ValueError(f"TopKRouting: logits must be [T, E], got shape {tuple(logits.shape)}")
    if logits.dtype != torch.float32:
        raise ValueError(f"TopKRouting: logits must be float32 (router math is fp32), got {logits.dtype}")
    num_experts = logits.shape[1]
    check_routing(num_experts, k, scoring, n_group, topk_group, group_scoring, norm_min, jitter_eps)
    if selection_bias is not None and scoring == "sparsemixer":
        raise ValueError("TopKRouting: scoring 'sparsemixer' takes no selection_bias (pass None)")
    if selection_bias is not None:
        if tuple(selection_bias.shape) != (num_experts,) or selection_bias.dtype != torch.float32:
            raise ValueError(
                f"TopKRouting: selection_bias must be float32 [E={num_experts}], got {selection_bias.dtype} "
                f"{list(selection_bias.shape)} (or pass None for no bias)")


def _scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    return torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)


def selection_scores(
    scores: torch.Tensor, selection_bias: torch.Tensor | None = None, n_group: int = 1, topk_group: int = 1,
    group_scoring: str = "top2_sum",
) -> torch.Tensor:
    """The scores the experts are chosen by ``[T, E]``: biased, ``-inf`` outside the kept groups."""
    sel = scores if selection_bias is None else scores + selection_bias  # [T, E]
    if n_group == 1:
        return sel
    num_tokens, num_experts = sel.shape
    size = num_experts // n_group
    grouped = sel.view(num_tokens, n_group, size)  # [T, G, S]
    if group_scoring == "top2_sum":
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
    else:  # max
        group_scores = grouped.amax(dim=-1)  # [T, G]
    # stable descending sort: equal group scores keep the lower group first
    kept = torch.sort(group_scores, dim=-1, descending=True, stable=True).indices[:, :topk_group]  # [T, TG]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)  # [T, G]
    return grouped.masked_fill(~keep[:, :, None], float("-inf")).view(num_tokens, num_experts)  # [T, E]


def routing_weights(
    logits: torch.Tensor, indices: torch.Tensor, scoring: str, normalize: int, scale: float, norm_min: float = 0.0,
    jitter_eps: float = 0.01,
) -> torch.Tensor:
    """Weights of the chosen experts, differentiable in ``logits`` (indices fixed).

    The unbiased scores, so the selection bias (which only chooses) never reaches the weights.
    ``normalize``: 0 (or False) none, 1 (or True) divide by their sum, 2 by their Euclidean norm.
    sparsemixer: the two masked softmaxes (its masks and picks are piecewise constant, as in
    transformers' eval mode, where the gradient flows through the softmaxes only).
    """
    if scoring == "sparsemixer":
        weights = sparsemixer(logits, jitter_eps)[0]  # [T, 2]; its picks are ``indices``
    else:
        weights = _scores(logits, scoring).gather(-1, indices.long())  # [T, K]
    weights = _normalized(weights, normalize, norm_min)
    return weights * scale


def _normalized(weights: torch.Tensor, normalize: int, norm_min: float) -> torch.Tensor:
    """``weights`` [T, K] divided as ``normalize`` says: 0 not, 1 by max(their sum, norm_min), 2 by their Euclidean norm."""
    if int(normalize) == 2:
        return weights / weights.square().sum(dim=-1, keepdim=True).sqrt()
    if normalize:
        total = weights.sum(dim=-1, keepdim=True)  # [T, 1]
        return weights / (total.clamp(min=norm_min) if norm_min else total)
    return weights


def sparsemixer(logits: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's top-2, transformers' ``sparsemixer`` in eval mode op for op: ``(weights [T, 2], indices int64 [T, 2])``.

    Each pick's weight is its softmax over the logits within a relative ``2 * jitter_eps`` of it
    (every other logit masked to ``-inf``); the second pick excludes the first.
    """
    threshold = 2 * jitter_eps

    def pick(candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        best, index = candidates.max(dim=-1, keepdim=True)  # [T, 1] x2 (max returns the first of equal values)
        factor = logits.abs().clamp(min=best)  # [T, E] max(|logits|, best)
        masked = candidates.masked_fill((best - logits) / factor > threshold, float("-inf"))  # [T, E]
        return torch.softmax(masked, dim=-1).gather(-1, index), index  # [T, 1] x2

    w1, i1 = pick(logits)
    w2, i2 = pick(torch.scatter(logits, -1, i1, float("-inf")))
    return torch.cat((w1, w2), dim=-1), torch.cat((i1, i2), dim=-1)  # [T, 2] x2


def _topk_routing(
    logits: torch.Tensor, k: int, scoring: str = "softmax", normalize: int = 0, scale: float = 1.0,
    selection_bias: torch.Tensor | None = None, n_group: int = 1, topk_group: int = 1,
    group_scoring: str = "top2_sum", norm_min: float = 0.0, jitter_eps: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route each token to its ``k`` best experts; returns ``(weights f32 [T,k], indices i32 [T,k])``."""
    _check(logits, k, scoring, selection_bias, n_group, topk_group, group_scoring, norm_min, normalize, jitter_eps)
    if scoring == "sparsemixer":
        weights, indices = sparsemixer(logits, jitter_eps)  # [T, 2] x2
        weights = _normalized(weights, normalize, norm_min)
        return (weights * scale).contiguous(), indices.to(torch.int32).contiguous()
    scores = _scores(logits, scoring)  # [T, E]
    sel = selection_scores(scores, selection_bias, n_group, topk_group, group_scoring)  # [T, E]
    # A stable descending sort keeps equal scores in expert order, so ties go to the lower
    # index; torch.topk gives no such guarantee.
    indices = torch.sort(sel, dim=-1, descending=True, stable=True).indices[:, :k]  # [T, K]
    weights = routing_weights(logits, indices, scoring, normalize, scale, norm_min)
    return weights.contiguous(), indices.to(torch.int32).contiguous()


# The schema comes from SPEC (TORCH_ARGS with the spec's kinds and defaults);
# tests/moetrt/test_op_spec.py checks it and the Python signatures against SPEC.
topk_routing = torch.library.custom_op(
    "moetrt::TopKRouting", _topk_routing, mutates_args=(),
    schema=SPEC.torch_schema(TORCH_ARGS, "(Tensor, Tensor)", TORCH_KINDS),
)


@topk_routing.register_fake
def _(logits, k, scoring="softmax", normalize=0, scale=1.0, selection_bias=None, n_group=1, topk_group=1,
      group_scoring="top2_sum", norm_min=0.0, jitter_eps=0.01):
    _check(logits, k, scoring, selection_bias, n_group, topk_group, group_scoring, norm_min, normalize, jitter_eps)
    num_tokens = logits.shape[0]
    return logits.new_empty(num_tokens, k), logits.new_empty(num_tokens, k, dtype=torch.int32)


def _setup_context(ctx, inputs, output):
    logits, _k, scoring, normalize, scale = inputs[:5]
    norm_min = inputs[1 + TORCH_ARGS.index("norm_min")]
    ctx.save_for_backward(logits, output[1])
    jitter_eps = inputs[1 + TORCH_ARGS.index("jitter_eps")]
    ctx.options = (scoring, normalize, scale, norm_min, jitter_eps)


def _backward(ctx, grad_weights, _grad_indices):
    logits, indices = ctx.saved_tensors
    with torch.enable_grad():
        leaf = logits.detach().requires_grad_()
        weights = routing_weights(leaf, indices, *ctx.options)
        (grad_logits,) = torch.autograd.grad(weights, leaf, grad_weights)
    # the selection bias only chooses (indices are piecewise constant in it): no gradient
    return (grad_logits,) + (None,) * len(TORCH_ARGS)


topk_routing.register_autograd(_backward, setup_context=_setup_context)


def selection_scores_reference(
    scores: np.ndarray, selection_bias: np.ndarray | None = None, n_group: int = 1, topk_group: int = 1,
    group_scoring: str = "top2_sum",
) -> np.ndarray:
    """:func:`selection_scores` in NumPy, in the dtype of ``scores`` (``-inf`` outside the kept groups)."""
    sel = np.asarray(scores)
    if selection_bias is not None:
        sel = sel + np.asarray(selection_bias, dtype=sel.dtype)
    if n_group == 1:
        return sel
    num_tokens, num_experts = sel.shape
    grouped = sel.reshape(num_tokens, n_group, num_experts // n_group)  # [T, G, S]
    ranked = -np.sort(-grouped, axis=-1)  # [T, G, S] descending
    group_scores = ranked[..., 0] + ranked[..., 1] if group_scoring == "top2_sum" else ranked[..., 0]  # [T, G]
    kept = np.argsort(-group_scores, axis=-1, kind="stable")[:, :topk_group]  # [T, TG]
    keep = np.zeros(group_scores.shape, dtype=bool)
    np.put_along_axis(keep, kept, True, axis=-1)
    return np.where(keep[:, :, None], grouped, -np.inf).reshape(num_tokens, num_experts)


def sparsemixer_reference(logits: np.ndarray, jitter_eps: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`sparsemixer` in NumPy: ``(weights float64 [T, 2], indices int64 [T, 2])``.

    The picks and masks are decided on the float32 logits with a float32 threshold, as the op decides
    them (a float64 decision could differ at the mask's edge); the softmaxes are float64.
    """
    logits32 = np.asarray(logits, dtype=np.float32)
    threshold = np.float32(2 * np.float32(jitter_eps))
    with np.errstate(divide="ignore", invalid="ignore"):
        def pick(candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            index = np.argmax(candidates, axis=-1)[:, None]  # [T, 1] the first of equal values
            best = np.take_along_axis(candidates, index, axis=-1)  # [T, 1]
            factor = np.maximum(np.abs(logits32), best)  # [T, E]
            masked = np.where((best - logits32) / factor > threshold, -np.inf, candidates.astype(np.float64))
            shifted = np.exp(masked - masked.max(axis=-1, keepdims=True))
            return np.take_along_axis(shifted / shifted.sum(axis=-1, keepdims=True), index, axis=-1), index

        w1, i1 = pick(logits32)
        rest = logits32.copy()
        np.put_along_axis(rest, i1, -np.inf, axis=-1)
        w2, i2 = pick(rest)
    return np.concatenate((w1, w2), axis=-1), np.concatenate((i1, i2), axis=-1)


def _normalized_reference(weights: np.ndarray, normalize: int, norm_min: float) -> np.ndarray:
    """:func:`_normalized` in NumPy."""
    if int(normalize) == 2:
        return weights / np.sqrt((weights**2).sum(axis=-1, keepdims=True))
    if normalize:
        return weights / np.maximum(weights.sum(axis=-1, keepdims=True), norm_min)
    return weights


def topk_routing_reference(
    logits: np.ndarray, k: int, scoring: str = "softmax", normalize: int = 0, scale: float = 1.0,
    selection_bias: np.ndarray | None = None, n_group: int = 1, topk_group: int = 1,
    group_scoring: str = "top2_sum", norm_min: float = 0.0, jitter_eps: float = 0.01,
) -> tuple[np.ndarray, np.ndarray]:
    """NumPy reference of the op, computed in float64 and returned as (float32, int32)."""
    check_routing(np.shape(logits)[-1], k, scoring, n_group, topk_group, group_scoring, norm_min, jitter_eps)
    SPEC.attr("normalize").coerce(normalize, OP_NAME)
    if scoring == "sparsemixer":
        if selection_bias is not None:
            raise ValueError("TopKRouting: scoring 'sparsemixer' takes no selection_bias (pass None)")
        weights, order = sparsemixer_reference(logits, jitter_eps)
        return (_normalized_reference(weights, normalize, norm_min) * scale).astype(np.float32), order.astype(np.int32)
    logits = np.asarray(logits, dtype=np.float64)
    if selection_bias is not None and np.shape(selection_bias) != (logits.shape[-1],):
        raise ValueError(f"TopKRouting: selection_bias must be [E={logits.shape[-1]}], got {list(np.shape(selection_bias))}")
    if scoring == "softmax":
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        scores = shifted / shifted.sum(axis=-1, keepdims=True)
    else:  # sigmoid
        scores = 1.0 / (1.0 + np.exp(-logits))
    # float32 scores (and the float32 bias and group sums) decide ties, as the op does; a stable sort
    # of the negation keeps the lower index first
    bias = None if selection_bias is None else np.asarray(selection_bias, dtype=np.float32)
    sel = selection_scores_reference(scores.astype(np.float32), bias, n_group, topk_group, group_scoring)
    order = np.argsort(-sel, axis=-1, kind="stable")[:, :k]
    weights = np.take_along_axis(scores, order, axis=-1)
    weights = _normalized_reference(weights, normalize, norm_min)
    return (weights * scale).astype(np.float32), order.astype(np.int32)


# --- ONNX face ---------------------------------------------------------------------------------
def onnx_schema(version: int | None = None):
    """The ``OpSchema`` of ``moetrt::TopKRouting`` (default the newest version), registered only while exporting."""
    return SPEC.onnx_schema(version)


def onnx_schemas() -> list:
    """Every version's ``OpSchema`` (1: logits only, version-1 attributes; 2: selection bias and groups; 3: norm_min; 4: sparsemixer)."""
    return [SPEC.onnx_schema(v) for v in range(1, SPEC.version + 1)]


class RoutingVariant:
    """What a function body is specialised for: the scoring, a selection bias input, groups and their scoring,
    whether the renormalisation's denominator is clamped (``norm_min``, version 3), and the Euclidean
    norm (``normalize=2``).

    The body never compares a string attribute (TensorRT's parser rejects string Constants): each
    ``scoring`` and ``group_scoring`` gets its own body; ``k``, ``normalize``, ``scale``, ``n_group``,
    ``topk_group`` and ``norm_min`` stay int/float attribute references. A node with ``normalize=2`` gets a
    body that divides by the Euclidean norm where the others divide by the sum (whether it divides at all
    stays the ``normalize`` attribute), so the bodies of 0/1 nodes are those they always were.
    """

    def __init__(self, selection_bias: bool = False, n_group: int = 1, group_scoring: str = "top2_sum",
                 scoring: str = "softmax", norm_min: bool = False, normalize: int = 0):
        self.scoring = SPEC.attr("scoring").coerce(scoring, OP_NAME)
        self.selection_bias = bool(selection_bias)
        self.grouped = n_group > 1
        self.group_scoring = SPEC.attr("group_scoring").coerce(group_scoring, OP_NAME) if self.grouped else None
        self.norm_min = bool(norm_min)  # the body divides by max(sum, norm_min)
        self.l2 = SPEC.attr("normalize").coerce(normalize, OP_NAME) == 2

    @property
    def key(self) -> tuple:
        base = (self.scoring, self.selection_bias, self.grouped, self.group_scoring, self.norm_min)
        return base + ("l2",) if self.l2 else base

    @property
    def version(self) -> int:
        """4 for sparsemixer, 3 where the body reads norm_min, 2 where it reads a version-2 option (a selection bias
        or groups), else 1."""
        if self.scoring == "sparsemixer":
            return 4
        if self.norm_min:
            return 3
        return 2 if self.selection_bias or self.grouped else 1

    @property
    def name(self) -> str:
        """``""`` for the softmax version-1 body, else e.g. ``sigmoid+selection_bias+groups_top2_sum``."""
        parts = ([self.scoring] * (self.scoring != "softmax") + ["selection_bias"] * self.selection_bias
                 + [f"groups_{self.group_scoring}"] * self.grouped + ["norm_min"] * self.norm_min
                 + ["l2"] * self.l2)
        return "+".join(parts)

    @property
    def inputs(self) -> list[str]:
        return SPEC.input_names if self.selection_bias else ["logits"]


def onnx_variant(node) -> RoutingVariant:
    """The body variant an onnx-ir ``TopKRouting`` node needs (its scoring, selection bias input, groups, norm_min)."""
    attrs = SPEC.read_ir_attributes(node)
    inputs = list(node.inputs)
    i = SPEC.input_index("selection_bias")
    return RoutingVariant(i < len(inputs) and inputs[i] is not None, attrs["n_group"], attrs["group_scoring"],
                          attrs["scoring"], "norm_min" in SPEC.non_default(attrs), attrs["normalize"])


def node_version(node) -> int:
    """The ``moetrt`` domain version an onnx-ir ``TopKRouting`` node needs (``OpSpec.version_for``)."""
    inputs = list(node.inputs)
    present = tuple(name for i, name in enumerate(SPEC.input_names) if i < len(inputs) and inputs[i] is not None)
    return SPEC.version_for(SPEC.read_ir_attributes(node), present)


def onnx_function(opset: int, variant: RoutingVariant | None = None, overload: str = ""):
    """The model-local ``FunctionProto``: the op in standard ONNX ops, honouring every attribute.

    ``variant`` None gives the softmax version-1 body; the variant fixes ``scoring`` (the body
    computes only that one: a string comparison would make TensorRT's parser reject the body) and
    whether the body takes the bias input and/or groups (any ``n_group`` > 1 and ``topk_group``,
    read from the node's attributes; ``group_scoring`` fixed by the variant).
    """
    from moetrt.ops._onnx import BOOL, INT32, Body, make_function

    variant = variant or RoutingVariant()
    b = Body("tkr_")
    if variant.scoring == "sparsemixer":
        top, top_idx = _sparsemixer_body(b)  # [T, 2] float32, [T, 2] int64 (k is 2)
    else:
        top, top_idx = _scored_top_k(b, variant)  # [T, K] float32, [T, K] int64
    normalize = b.op("Cast", b.attr_const("normalize", "int"), to=BOOL)
    if variant.l2:  # the Euclidean norm (normalize=2)
        normed = b.op("Div", top, b.op("Sqrt", b.op("ReduceSumSquare", top, b.const([-1]), keepdims=1)))
    else:
        total = b.op("ReduceSum", top, b.const([-1]), keepdims=1)  # [T, 1]
        if variant.norm_min:  # version 3: the sum clamped from below
            total = b.op("Max", total, b.attr_const("norm_min", "float"))
        normed = b.op("Div", top, total)
    weights = b.op("Mul", b.op("Where", normalize, normed, top), b.attr_const("scale", "float"))
    b.rename_output(weights, "weights")
    b.rename_output(b.op("Cast", top_idx, to=INT32), "indices")
    # the attributes this body reads, with their defaults (jitter_eps only in the sparsemixer body)
    defaults = {a.name: a.default for a in SPEC.attrs if not a.required and a.since <= variant.version
                and variant.scoring in a.only_with.get("scoring", (variant.scoring,))}
    return make_function(
        OP_NAME, b, variant.inputs, ["weights", "indices"], opset,
        attributes=[a.name for a in SPEC.attrs if a.required],
        attribute_defaults=defaults | {"scoring": variant.scoring},
        doc="moetrt::TopKRouting in standard ONNX ops", overload=overload,
    )


def _scored_top_k(b, variant: RoutingVariant) -> tuple[str, str]:
    """softmax / sigmoid scores, the k best (biased, grouped: version 2): (weights [T, K], indices int64 [T, K])."""
    if variant.scoring == "softmax":
        scores = b.op("Softmax", "logits", axis=-1)  # [T, E]
    else:
        # 1 / (1 + exp(-x)) rather than Sigmoid: ONNX Runtime's CPU Sigmoid is exact to ~1e-7 absolute but
        # only ~2e-4 relative below x = -4, and normalizing divides those small scores by their small sum
        one = b.const(1.0, dtype=np.float32)
        scores = b.op("Reciprocal", b.op("Add", one, b.op("Exp", b.op("Neg", "logits"))))  # [T, E]
    k = b.op("Reshape", b.attr_const("k", "int"), b.const([1]))  # [1]
    if not (variant.selection_bias or variant.grouped):
        # ONNX TopK: sorted descending, equal values keep the lower index first
        return b.op("TopK", scores, k, axis=-1, largest=1, sorted=1, outputs=2)  # [T, K] x2
    sel = b.op("Add", scores, "selection_bias") if variant.selection_bias else scores  # [T, E]
    if variant.grouped:
        sel = _grouped_selection(b, sel, variant.group_scoring)  # [T, E], -inf outside the kept groups
    _, top_idx = b.op("TopK", sel, k, axis=-1, largest=1, sorted=1, outputs=2)  # [T, K] x2
    return b.op("GatherElements", scores, top_idx, axis=-1), top_idx  # [T, K] the unbiased scores


def _sparsemixer_body(b) -> tuple[str, str]:
    """PhiMoE's top-2 of ``logits`` [T, E] (the module docstring): (weights float32 [T, 2], indices int64 [T, 2])."""
    threshold = b.op("Mul", b.attr_const("jitter_eps", "float"), b.const(2.0, dtype=np.float32))  # [] 2 eps
    minus_inf = b.const(-np.inf, dtype=np.float32)
    magnitude = b.op("Abs", "logits")  # [T, E]

    def pick(candidates: str) -> tuple[str, str]:
        index = b.op("ArgMax", candidates, axis=-1, keepdims=1, select_last_index=0)  # [T, 1] the first best
        best = b.op("GatherElements", candidates, index, axis=-1)  # [T, 1]
        ratio = b.op("Div", b.op("Sub", best, "logits"), b.op("Max", magnitude, best))  # [T, E]
        masked = b.op("Where", b.op("Greater", ratio, threshold), minus_inf, candidates)  # [T, E]
        weight = b.op("GatherElements", b.op("Softmax", masked, axis=-1), index, axis=-1)  # [T, 1]
        return weight, index

    w1, i1 = pick("logits")
    rest = b.op("ScatterElements", "logits", i1, b.op("Expand", minus_inf, b.op("Shape", i1)), axis=-1)  # [T, E]
    w2, i2 = pick(rest)
    return b.op("Concat", w1, w2, axis=-1), b.op("Concat", i1, i2, axis=-1)  # [T, 2] x2


def _grouped_selection(b, sel: str, group_scoring: str) -> str:
    """``sel`` [T, E] with ``-inf`` outside each row's ``topk_group`` best of ``n_group`` groups."""
    from onnx import numpy_helper

    from moetrt.ops._onnx import BOOL
    n_group = b.op("Reshape", b.attr_const("n_group", "int"), b.const([1]))  # [1]
    size = b.op("Div", b.op("Shape", sel, start=1, end=2), n_group)  # [1] E / n_group (no -1: T may be 0)
    grouped_shape = b.op("Concat", b.op("Shape", sel, start=0, end=1), n_group, size, axis=0)  # [3]
    grouped = b.op("Reshape", sel, grouped_shape)  # [T, G, S]
    if group_scoring == "top2_sum":
        top2, _ = b.op("TopK", grouped, b.const([2]), axis=-1, largest=1, sorted=1, outputs=2)  # [T, G, 2] x2
        group_scores = b.op("ReduceSum", top2, b.const([-1]), keepdims=0)  # [T, G]
    else:  # max
        group_scores = b.op("ReduceMax", grouped, b.const([-1]), keepdims=0)  # [T, G]
    topk_group = b.op("Reshape", b.attr_const("topk_group", "int"), b.const([1]))  # [1]
    # equal group scores keep the lower group first (TopK's rule), as the torch op's stable sort
    _, kept = b.op("TopK", group_scores, topk_group, axis=-1, largest=1, sorted=1, outputs=2)  # [T, TG]
    # a one-hot of the kept groups: 1 where kept (ScatterElements without reduction, which the
    # TensorRT parser accepts)
    ones = b.op("Expand", b.const(1.0, dtype=np.float32), b.op("Shape", kept))  # [T, TG]
    zeros = b.op("ConstantOfShape", b.op("Shape", group_scores),
                 value=numpy_helper.from_array(np.zeros(1, np.float32)))  # [T, G]
    mask = b.op("ScatterElements", zeros, kept, ones, axis=1)  # [T, G]
    keep = b.op("Cast", b.op("Unsqueeze", mask, b.const([-1])), to=BOOL)  # [T, G, 1]
    masked = b.op("Where", keep, grouped, b.const(-np.inf, dtype=np.float32))  # [T, G, S]
    return b.op("Reshape", masked, b.op("Shape", sel))  # [T, E]
