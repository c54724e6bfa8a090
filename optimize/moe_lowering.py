"""Pass: ``moetrt::TopKRouting`` + ``moetrt::SparseMoE`` -> ``com.microsoft::MoE`` (ONNX Runtime).

Where it applies: the attribute values :data:`ROUTER_IMPLEMENTS` and :func:`experts_implements`
declare (reject by default: any other value, or an attribute the specs gain later, keeps the
function body, and the result says why): softmax scoring with ``scale == 1`` (ORT's op routes
with softmax, keeps the top ``k``, renormalises when ``normalize_routing_weights=1``, and has no
routed scaling factor), the ``silu`` and ``clamped_swiglu`` activations, with or without the
expert biases; constant expert weights; and an activation dtype the target runs the fused op in
(ORT CPU: float32; CUDA: float16/bfloat16). The gate/up weights (and biases) are re-laid out
interleaved (``swiglu_fusion=1``, rows g0, u0, g1, u1, ...), the only SwiGLU layout ORT's CPU
kernel takes.

ORT's SwiGLU (the op schema's documentation in ONNX Runtime 1.32, and the CPU kernel
``contrib_ops/cpu/moe/moe_utils.cc`` ``ApplySwiGLUActivation``)::

    g, l = fc1 rows 2i, 2i+1 (+ fc1_experts_bias)        G = min(g, swiglu_limit)
    L = clamp(l, -swiglu_limit, swiglu_limit)             h = G * sigmoid(activation_alpha * G) * (L + activation_beta)
    out = fc2 h + fc2_experts_bias;  y = sum_j w_j * out_j (the bias is weighted with its expert)

with no clamp when ``swiglu_limit`` is absent. ``silu`` is ``activation_alpha=1,
activation_beta=0`` without a limit; gpt-oss's ``clamped_swiglu`` is ``activation_alpha=alpha,
activation_beta=1, swiglu_limit=limit``: SparseMoE's definition term for term (checked against a
NumPy reference in the tests).

Where it helps (``policy="auto"``, the default): measured per shape class on ONNX Runtime 1.32
CPU, 2 cores shared with other jobs, one layer, speedup of the fused op over the function body
(benchmarks/bench_moe_lowering.py, results/moe_lowering.md; ranges over two runs, one of them
interleaving the graphs' runs; the load moved single numbers, not the pattern):

    shape class (D, F, E, K)        T=1        T=4        T=16       T=64       T=256       T=512
    tiny (128, 192, 8, 2)           2.0-2.3x   1.5-1.6x   1.2-1.6x   0.8-1.0x   0.4-0.6x    0.1-0.2x
    bench-small (1024, 3584, 8, 2)  2.3-2.4x   1.0x       1.1x       0.7-1.2x   0.35-0.85x  0.7-0.8x
    (256, 512, 64, 2)               2.1-2.3x   1.4-5.4x   2.2-6.8x   1.0x       1.0x        1.1-1.4x
    (256, 256, 64, 8)               1.3-2.3x   noisy      0.7-1.2x   1.0-1.1x   1.0x        1.0x

The fused op wins wherever a step routes at most one (token, slot) pair per expert on average
(T * K <= E: decode steps), by 1.3-2.4x at T=1 and up to 5-7x for 64 experts at T=4-16: there
the function body's decode path gathers whole expert weight matrices (a copy as large as the
weights it then reads), while the fused op reads them in place. With more rows per expert
(prefill) the body's sorted-by-expert path, whose per-expert GEMMs use every core, ties or beats
the fused op, whose CPU kernel parallelises over experts only and runs each expert's GEMM on one
thread: 1.2-2.5x slower with 8 experts at T=256.
So ``auto`` emits ``If(T * K <= E, MoE, function body)`` per layer: decode steps take the fused
op, prefill keeps the body, in one graph (the interleaved weights are a Reshape/Transpose of the
same initializer that ONNX Runtime folds at session creation, so the file holds them once).
Measured the same way, ``auto`` runs one layer 1.8-2.1x faster than the body at T=1 and within
noise of it (0.85-1.16x) from T=64 up; on bench-small a whole 1x256 prefill takes the same time
with and without it (1092 vs 1112 ms, interleaved) while ``always`` takes 1172 ms.
Since then the body stopped gathering large experts (it slices them in place at decode too), and
there it beats the fused op: ``auto`` lowers only layers whose body still gathers at decode
(``_body_wins_at_decode``).
``policy="always"`` emits the fused op alone (smaller graph, for runtimes where it wins at
every T, such as CUDA).

Routings ORT cannot compute (TopKRouting version 2: a ``selection_bias`` input or groups; sigmoid
scoring; ``scale != 1``; ``normalize=2``, DBRX's Euclidean norm) still use the fused expert kernel, through the log-weights path
(:data:`ROUTINGS` ``"log_weights"``; the attribute values :func:`log_weights_implements`
declares): the ``TopKRouting`` node stays (its function body runs the routing, bias, groups and
all) and the fused op is fed ``router_probs = ScatterElements(lowest float32 [T, E], indices,
Log(weights))``, finite only at the k chosen experts, the log-scores ONNX Runtime's own
``MoEGroupRouter`` writes for it. ORT's softmax then top-k over that row chooses exactly those
experts (every other entry underflows to weight 0) with weights ``w_i / sum_j w_j``
(``normalize_routing_weights=1``), so the output is multiplied by what the weights sum to:
``ReduceSum(weights)`` [T, 1] without ``normalize``, with ``normalize=2`` or with a ``norm_min`` clamp (version 3),
the constant ``scale`` with ``normalize=1`` (the router's weights sum to ``scale`` there; nothing where ``scale == 1``).
That is exact up to float32 rounding
of the exp/log round trip (a few ulps of each weight: the lowered families' logits stay within
3e-6 of the PyTorch reference, as the canonical export's do; tests/optimize/test_moe_lowering.py). The weights must be positive (``scale > 0``: their log); a zero weight (a sigmoid that
underflowed) gives ``-inf``, whose expert then mixes with weight 0 as it should. QMoE takes the
weights themselves instead: its ``router_weights`` input ``ScatterElements(zeros [T, E], indices,
weights)`` is what it mixes with (the gathered values, neither renormalised nor exponentiated, with
``normalize_routing_weights=0``; checked on ORT 1.32 CPU), so it needs neither the log's
rounding nor the product, and ``router_probs`` (the same log-scores) only chooses. The plain
com.microsoft::MoE has no such input (ORT 1.32), hence the product there.

PhiMoE's ``sparsemixer`` scoring takes the log-weights path too. com.microsoft::MoE has a
``use_sparse_mixer`` attribute, but ONNX Runtime 1.32's CPU kernel ignores it: with
``use_sparse_mixer=1`` its output equals softmax top-2 routing's, not sparsemixer's (measured;
tests/moetrt/test_phimoe.py keeps checking it), so the ``logits`` path refuses sparsemixer with that
reason (:data:`SPARSE_MIXER_REFUSAL`, recorded in the pass's details) and the kept node routes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from moetrt.ops._onnx import DOMAIN
from moetrt.ops.sparse_moe import SPEC as SPARSE_MOE, gather_threshold
from moetrt.ops.topk_routing import GROUP_SCORINGS, SCORINGS, SPEC as TOPK_ROUTING

from ._common import ORT_DOMAIN, MoELayer, PassResult, lazy_tensor, read_moe_layer, refusal, remove_dead_code

__all__ = [
    "lower_moe", "interleave_gate_up", "moe_attributes", "lowering_blocker", "experts_implements", "ROUTER_IMPLEMENTS",
    "POLICIES", "ROUTINGS", "log_weights_implements", "routing_of", "log_weight_scores", "chosen_weights",
    "SPARSE_MIXER_REFUSAL",
]

POLICIES = ("auto", "always")

# TopKRouting attribute values com.microsoft::MoE and QMoE compute (k: any; scale: only its default 1)
ROUTER_IMPLEMENTS = {"scoring": ("softmax",), "normalize": (0, 1)}
_ROUTER_LIMITS = {
    "scoring": "ONNX Runtime's MoE ops route with softmax only",
    "scale": "ONNX Runtime's MoE ops have no routed scaling factor",
}
# why sparsemixer routing is not handed to the fused op's own use_sparse_mixer (checked in the PhiMoE tests)
SPARSE_MIXER_REFUSAL = ("com.microsoft::MoE's use_sparse_mixer is not used: ONNX Runtime 1.32's CPU kernel ignores it "
                        "(with use_sparse_mixer=1 its output equals softmax top-2 routing's), so the TopKRouting node "
                        "routes and the fused op mixes its weights (log-weights path)")
# how the fused op gets its routing: "logits" (it routes on the router logits itself: ROUTER_IMPLEMENTS)
# or "log_weights" (the TopKRouting node stays and routes; the fused op mixes its weights)
ROUTINGS = ("logits", "log_weights")
_LOG_WEIGHTS_LIMITS = {"scale": "the log-weights path feeds the fused op log(weights), which needs scale > 0"}
_EXPERTS_LIMITS = {"weight_input": "ONNX Runtime's MoE ops weight the experts' outputs, not their inputs"}
# where the fused ops' router input is not chosen: below every log-weight, and exp() of it underflows to 0
_UNCHOSEN = float(np.finfo(np.float32).min)


def log_weights_implements(values: dict) -> dict:
    """The TopKRouting attribute values the log-weights path computes, for a node with ``values``.

    The kept TopKRouting node routes (any scoring, bias, groups, ``norm_min``, any normalize: DBRX's Euclidean
    norm too); the fused op only mixes its weights, through their log, so they must be positive: a finite
    ``scale > 0``.
    """
    scale = values["scale"]
    return {
        "scoring": SCORINGS, "normalize": (0, 1, 2), "scale": (scale,) if np.isfinite(scale) and scale > 0 else (),
        "n_group": (values["n_group"],), "topk_group": (values["topk_group"],), "group_scoring": GROUP_SCORINGS,
        "norm_min": (values["norm_min"],),
        "jitter_eps": (values["jitter_eps"],),
    }


def _has_selection_bias(router: ir.Node) -> bool:
    index = TOPK_ROUTING.input_index("selection_bias")
    return len(router.inputs) > index and router.inputs[index] is not None


def routing_of(layer: MoELayer, what: str = "com.microsoft::MoE") -> tuple[str | None, str | None]:
    """(routing, None): how ``what`` takes this layer's routing (one of :data:`ROUTINGS`); (None, reason) if not at all.

    ``"logits"`` where ORT's own softmax routing computes TopKRouting exactly (the layers lowered
    before version 2, unchanged), ``"log_weights"`` for every other routing the kept node computes.
    """
    attributes = layer.router_attributes
    if not _has_selection_bias(layer.router) and refusal(TOPK_ROUTING, attributes, ROUTER_IMPLEMENTS, what) is None:
        return "logits", None
    reason = refusal(TOPK_ROUTING, attributes, log_weights_implements(attributes), what, _LOG_WEIGHTS_LIMITS)
    return (None, reason) if reason is not None else ("log_weights", None)


def log_weight_scores(op, layer: MoELayer) -> ir.Value:
    """[T, E] float32: ``log(weights)`` at each token's chosen experts, the lowest float32 elsewhere.

    ``op`` builds the nodes (a rewriter's ``op``, or :class:`_Nodes` for an If branch).
    """
    weights, indices = layer.router.outputs  # [T, K] float32, [T, K] int32
    fill = op.Expand(op.Constant(value=ir.tensor(np.array(_UNCHOSEN, np.float32))), op.Shape(layer.logits))  # [T, E]
    scores = op.ScatterElements(fill, indices, op.Log(weights), axis=1)  # [T, E]
    scores.type, scores.shape = layer.logits.type, layer.logits.shape
    return scores


def chosen_weights(op, layer: MoELayer) -> ir.Value:
    """[T, E] float32: the routing weights at each token's chosen experts, 0 elsewhere (QMoE's router_weights)."""
    weights, indices = layer.router.outputs  # [T, K] float32, [T, K] int32
    zeros = op.Expand(op.Constant(value=ir.tensor(np.array(0.0, np.float32))), op.Shape(layer.logits))  # [T, E]
    mixing = op.ScatterElements(zeros, indices, weights, axis=1)  # [T, E]
    mixing.type, mixing.shape = layer.logits.type, layer.logits.shape
    return mixing


def _weights_total(op, layer: MoELayer, like: ir.Value) -> ir.Value | None:
    """What the router's k weights sum to, in ``like``'s dtype ([T, 1], or a scalar), or None where it is 1.

    With ``norm_min`` (TopKRouting version 3) a renormalised row sums to ``scale * sum / max(sum, norm_min)``,
    below ``scale`` where the clamp acted: the sum is then read off the weights, as without ``normalize``
    (and as with the Euclidean norm, ``normalize=2``, which leaves any sum).
    """
    if layer.normalize == 1 and not layer.router_attributes["norm_min"]:  # divided by the sum, then scaled
        if layer.scale == 1.0:
            return None
        total = op.Constant(value=ir.tensor(np.array(layer.scale, np.float32)))  # [] float32
        total.type, total.shape = layer.logits.type, ir.Shape([])
        return cast_like(op, total, like)
    total = op.ReduceSum(layer.router.outputs[0], op.Constant(value=ir.tensor(np.array([1], np.int64))),
                         keepdims=1)  # [T, 1] float32
    total.type = layer.logits.type
    return cast_like(op, total, like)


def cast_like(op, value: ir.Value, like: ir.Value) -> ir.Value:
    """``value`` cast to ``like``'s dtype (the fused ops take router inputs in the activation dtype)."""
    if value.dtype == like.dtype:
        return value
    cast = op.Cast(value, to=like.dtype)
    cast.type, cast.shape = ir.TensorType(like.dtype), value.shape
    return cast


class _Nodes:
    """``op.X(*inputs, _domain=..., **attributes)`` that collects plain nodes (for an If branch): one output each."""

    def __init__(self):
        self.nodes: list[ir.Node] = []

    def __getattr__(self, op_type: str):
        def make(*inputs, _domain: str = "", **attributes):
            node = ir.node(op_type, list(inputs), attributes=attributes, domain=_domain)
            self.nodes.append(node)
            return node.outputs[0]

        return make


def log_weights_moe(op, layer: MoELayer, x: ir.Value, fc1: ir.Value, w_down: ir.Value, fc1_bias: ir.Value | None,
                    fc2_bias: ir.Value | None) -> ir.Value:
    """The log-weights path's ``com.microsoft::MoE`` (times the weights' total): y [T, D]."""
    router = cast_like(op, log_weight_scores(op, layer), x)  # [T, E]
    y = op.MoE(*_moe_inputs(x, router, fc1, fc1_bias, w_down, fc2_bias), _domain=ORT_DOMAIN,
               **moe_attributes(layer, normalize=1))  # [T, D]
    y.type, y.shape = x.type, x.shape
    total = _weights_total(op, layer, x)
    if total is None:
        return y
    out = op.Mul(y, total)  # [T, D]
    out.type, out.shape = x.type, x.shape
    return out


def experts_implements(values: dict) -> dict:
    """The SparseMoE attribute values com.microsoft::MoE and QMoE compute, for a node with ``values``.

    Their SwiGLU takes ``activation_alpha``, ``activation_beta`` and ``swiglu_limit`` as plain
    floats: ``silu``, and ``clamped_swiglu`` with any finite ``alpha`` and a positive ``limit``
    (ORT clamps ``l`` to [-limit, limit], which needs limit > 0).
    """
    alpha, limit = values["alpha"], values["limit"]
    return {
        "activation": ("silu", "clamped_swiglu"),
        "alpha": (alpha,) if np.isfinite(alpha) else (),
        "limit": (limit,) if limit > 0 else (),
    }


def interleave_gate_up(w_gate_up: np.ndarray) -> np.ndarray:
    """[E, 2F, ...] gate rows then up rows -> [E, 2F, ...] rows g0, u0, g1, u1, ... (``swiglu_fusion=1``).

    The weights [E, 2F, D] and the biases [E, 2F] alike.
    """
    experts, two_f, *rest = w_gate_up.shape
    ffn = two_f // 2
    pairs = w_gate_up.reshape(experts, 2, ffn, *rest).swapaxes(1, 2)  # [E, F, 2, ...]: (gate_f, up_f) pairs
    return np.ascontiguousarray(pairs.reshape(w_gate_up.shape))


def moe_attributes(layer: MoELayer, normalize: int | None = None) -> dict:
    """The routing and activation attributes ``com.microsoft::MoE`` and ``QMoE`` share.

    ORT applies softmax to ``router_probs`` itself (it takes the logits), keeps the top ``k`` and,
    with ``normalize_routing_weights=1``, divides them by their sum: TopKRouting with softmax
    scoring and ``scale == 1``. SwiGLU is ``G * sigmoid(alpha * G) * (clamp(up, +-limit) + beta)``
    with ``G = min(gate, limit)``: ``silu`` is ``alpha=1, beta=0`` (set explicitly: their defaults
    have changed between releases) and no ``swiglu_limit`` (no clamp); ``clamped_swiglu`` is
    the node's ``alpha``, ``beta=1`` (gpt-oss's ``up + 1``) and its ``limit``. ``normalize``
    replaces the layer's ``normalize_routing_weights`` (the log-weights path sets its own).
    """
    normalize = int(layer.normalize) if normalize is None else normalize
    attributes = dict(k=layer.k, normalize_routing_weights=normalize, activation_type="swiglu", swiglu_fusion=1)
    if layer.activation == "silu":
        return {**attributes, "activation_alpha": 1.0, "activation_beta": 0.0}
    assert layer.activation == "clamped_swiglu", layer.activation  # lowering_blocker refused the others
    values = layer.expert_attributes
    return {**attributes, "activation_alpha": values["alpha"], "activation_beta": 1.0, "swiglu_limit": values["limit"]}


def lowering_blocker(
    layer: MoELayer | str, dtypes: tuple[ir.DataType, ...], what: str = "com.microsoft::MoE",
    router: dict | None = None, experts: Callable[[dict], dict] = experts_implements,
) -> str | None:
    """Why the fused ORT op ``what`` cannot compute this layer exactly, or None when it can.

    ``router`` / ``experts(values)``: the TopKRouting / SparseMoE attribute values the lowering
    implements (every other value is refused: ``OpSpec.unsupported``); ``router`` None: either
    routing path (:func:`routing_of`), the fused op routing itself or the kept node routing.
    """
    if isinstance(layer, str):
        return layer
    if router is None:
        reason = routing_of(layer, what)[1]
    elif _has_selection_bias(layer.router):
        reason = f"{what} routes on the logits alone: the node's selection_bias cannot reach it"
    else:
        reason = refusal(TOPK_ROUTING, layer.router_attributes, router, what, _ROUTER_LIMITS)
    reason = reason or refusal(SPARSE_MOE, layer.expert_attributes, experts(layer.expert_attributes), what,
                               _EXPERTS_LIMITS)
    if reason is not None:
        return reason
    dtype = layer.x.dtype
    if dtype not in dtypes:
        names = ", ".join(d.name.lower() for d in dtypes)
        have = dtype.name.lower() if dtype else "of unknown type"
        return f"x is {have}: this target runs the fused op in {names} only"
    if layer.x.shape is not None and len(layer.x.shape) != 2:
        return f"x has rank {len(layer.x.shape)}, expected [T, D]"
    return None


def fused_moe_nodes(layer: MoELayer, x: ir.Value, fc1: ir.Value, w_down: ir.Value, fc1_bias: ir.Value | None = None,
                    fc2_bias: ir.Value | None = None) -> list[ir.Node]:
    """``com.microsoft::MoE(x, logits, fc1, fc1_bias, fc2, fc2_bias)`` for ``layer`` (fc1 and its bias
    interleaved; absent biases left out), after a Cast of the logits where x is not float32; the MoE node is last."""
    logits = layer.logits
    nodes = []
    if x.dtype != ir.DataType.FLOAT:  # the fused op takes the router input in the activation dtype
        cast = ir.node("Cast", [logits], attributes={"to": x.dtype})
        cast.outputs[0].type, cast.outputs[0].shape = ir.TensorType(x.dtype), logits.shape
        logits, nodes = cast.outputs[0], [cast]
    node = ir.node("MoE", _moe_inputs(x, logits, fc1, fc1_bias, w_down, fc2_bias), attributes=moe_attributes(layer),
                   domain=ORT_DOMAIN)
    node.outputs[0].type, node.outputs[0].shape = x.type, x.shape
    return nodes + [node]


def _moe_inputs(x, logits, fc1, fc1_bias, fc2, fc2_bias) -> list:
    """MoE's inputs, without trailing absent ones (a layer without biases: exactly the five it always had)."""
    inputs = [x, logits, fc1, fc1_bias, fc2, fc2_bias]
    while inputs[-1] is None:
        inputs.pop()
    return inputs


def interleaved_gate_up_bias(op, layer: MoELayer, b_gate_up: ir.Value | None) -> ir.Value | None:
    """``b_gate_up`` [E, 2F] as a new initializer interleaved like fc1 (computed when saved), or None."""
    if b_gate_up is None:
        return None
    source = layer.b_gate_up_tensor
    return op.initializer(lazy_tensor(lambda: interleave_gate_up(source.numpy()), source.dtype, source.shape,
                                      name=f"{b_gate_up.name}.interleaved", sources=[source]))


def expert_bias_inputs(experts: ir.Node) -> tuple[ir.Value | None, ir.Value | None]:
    """SparseMoE's ``b_gate_up`` and ``b_down`` inputs (None where absent)."""
    inputs = list(experts.inputs) + [None] * len(SPARSE_MOE.inputs)
    return (inputs[SPARSE_MOE.input_index("b_gate_up")], inputs[SPARSE_MOE.input_index("b_down")])


class _LowerToMoE(pattern.RewriteRuleClassBase):
    def __init__(self, dtypes: tuple[ir.DataType, ...], policy: str, result: PassResult):
        super().__init__(name="LowerToMoE")
        self.dtypes, self.policy, self.result = dtypes, policy, result

    def pattern(self, op, x, weights, indices, w_gate_up, w_down):
        # the optional biases (inputs 5, 6) are read by read_moe_layer, which refuses what it cannot read
        return op.SparseMoE(x, weights, indices, w_gate_up, w_down, _domain=DOMAIN, _allow_other_attributes=True,
                            _allow_other_inputs=True, _outputs=["y"])

    def check(self, context, y, **_):
        check = pattern.MatchResult()
        if context.graph_or_function is not context.model.graph:
            return check.fail("SparseMoE inside a subgraph or function (the kept branch of a lowered layer)")
        node = y.producer()
        layer = read_moe_layer(node)
        reason = lowering_blocker(layer, self.dtypes)
        if reason is None and self.policy == "auto":
            reason = _body_wins_at_decode(layer)
        if reason is None and layer.scoring == "sparsemixer":
            self.result.details.setdefault("routing", {})[node.name or "SparseMoE"] = SPARSE_MIXER_REFUSAL
        if reason is not None:
            self.result.skipped[node.name or "SparseMoE"] = reason
            return check.fail(reason)
        return check

    def rewrite(self, op, x, weights, indices, w_gate_up, w_down, y, **_):
        experts = y.producer()
        layer = read_moe_layer(experts)
        assert isinstance(layer, MoELayer)
        self.result.count += 1
        b_gate_up, b_down = expert_bias_inputs(experts)
        if self.policy == "always":
            source = layer.w_gate_up_tensor
            fc1 = op.initializer(lazy_tensor(  # computed when saved, one layer at a time
                lambda: interleave_gate_up(source.numpy()), source.dtype, source.shape,
                name=f"{w_gate_up.name}.interleaved", sources=[source],
            ))
            fc1_bias = interleaved_gate_up_bias(op, layer, b_gate_up)
            if routing_of(layer)[0] == "log_weights":
                return log_weights_moe(op, layer, x, fc1, w_down, fc1_bias, b_down)
            logits = layer.logits
            if x.dtype != ir.DataType.FLOAT:  # the fused op takes the router input in the activation dtype
                logits = op.Cast(layer.logits, to=x.dtype)
                logits.type, logits.shape = ir.TensorType(x.dtype), layer.logits.shape
            return op.MoE(*_moe_inputs(x, logits, fc1, fc1_bias, w_down, b_down), _domain=ORT_DOMAIN,
                          **moe_attributes(layer))

        # auto: If(T * K <= E) the fused op, else the function body. The interleaved fc1 is a
        # Reshape/Transpose of the initializer that ONNX Runtime folds once at session creation,
        # so the file holds the expert weights once.
        E, F, D = layer.num_experts, layer.ffn_size, layer.hidden_size
        fc1 = op.Reshape(
            op.Transpose(op.Reshape(w_gate_up, op.Constant(value=ir.tensor(np.array([E, 2, F, D], np.int64)))),
                         perm=[0, 2, 1, 3]),
            op.Constant(value=ir.tensor(np.array([E, 2 * F, D], np.int64))),
        )  # [E, 2F, D], rows g0, u0, g1, u1, ...
        fc1.type, fc1.shape = w_gate_up.type, ir.Shape([E, 2 * F, D])
        fc1_bias = None
        if b_gate_up is not None:  # [E, 2F] interleaved the same way
            fc1_bias = op.Reshape(
                op.Transpose(op.Reshape(b_gate_up, op.Constant(value=ir.tensor(np.array([E, 2, F], np.int64)))),
                             perm=[0, 2, 1]),
                op.Constant(value=ir.tensor(np.array([E, 2 * F], np.int64))),
            )
            fc1_bias.type, fc1_bias.shape = b_gate_up.type, ir.Shape([E, 2 * F])
        tokens = op.Shape(x, start=0, end=1)  # [1]: T
        decode = op.LessOrEqual(tokens, op.Constant(value=ir.tensor(np.array([E // layer.k], np.int64))))  # [1] bool
        if routing_of(layer)[0] == "log_weights":
            branch = _Nodes()
            out = log_weights_moe(branch, layer, x, fc1, w_down, fc1_bias, b_down)
            fused = branch.nodes
            assert fused[-1].outputs[0] is out
        else:
            fused = fused_moe_nodes(layer, x, fc1, w_down, fc1_bias, b_down)
        kept = ir.node("SparseMoE", list(experts.inputs), attributes=dict(experts.attributes), domain=DOMAIN,
                       overload=experts.overload)  # the overload names the function body variant it runs
        kept.outputs[0].type, kept.outputs[0].shape = y.type, y.shape
        then_branch = ir.Graph([], [fused[-1].outputs[0]], nodes=fused, name=f"{layer.name}_fused")
        else_branch = ir.Graph([], [kept.outputs[0]], nodes=[kept], name=f"{layer.name}_function_body")
        return op.If(decode, then_branch=then_branch, else_branch=else_branch)


def _body_wins_at_decode(layer: MoELayer) -> str | None:
    """``auto`` keeps the body where it reads the experts in place at decode too (large experts).

    The measurements above compared the fused op with the body's gather path. The body gathers
    only small experts now (``moetrt.ops.sparse_moe.gather_threshold``); larger ones it slices in
    place, and there it beat the fused op at decode: bench-small, 2 cores, ORT 1.32, 74 vs 61
    tok/s over 10 paired rounds (benchmarks/results/runtime_cpu.md).
    """
    if gather_threshold(layer.num_experts, layer.expert_bytes) <= 1:
        return ("the function body reads these large experts in place at decode, which measured faster than "
                "com.microsoft::MoE on the CPU (bench-small 74 vs 61 tok/s); policy 'always' lowers anyway")
    return None


def lower_moe(
    model: ir.Model, dtypes: tuple[ir.DataType, ...] = (ir.DataType.FLOAT,), policy: str = "auto"
) -> PassResult:
    """Lower every MoE layer ONNX Runtime's fused ``MoE`` computes exactly; returns what changed.

    ``dtypes``: the activation dtypes the target runs the fused op in. ``policy``: ``"auto"``
    uses the fused op for decode-sized steps (T * K <= E) and keeps the function body otherwise
    (see the module docstring for the measurements); ``"always"`` uses it for every T.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    result = PassResult("lower_moe", details={"policy": policy})
    _LowerToMoE.rule(dtypes, policy, result).apply_to_model(model)
    remove_dead_code(model)
    return result
