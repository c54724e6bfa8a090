"""``moetrt::TopKRouting`` version 3: ``norm_min``, the renormalisation's denominator clamped from below
(ERNIE-4.5-MoE's ``moe_norm_min``): ``weights /= max(weights.sum(-1), norm_min)``.

Every face agrees (torch op, NumPy reference, ONNX function body in ONNX Runtime) on rows where the clamp
acts and rows where it does not (both asserted); a tiny ``norm_min`` is the plain renormalisation bit for
bit; the attribute applies only with ``normalize`` (a node without it stays version 1 or 2 and its body is
unchanged); transformers' ``Ernie4_5_MoeTopKRouter`` matches; bad values raise ValueErrors naming it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moetrt.ops  # noqa: F401  (registers the torch ops)
from moetrt.ops._onnx import PLUGIN_NAMESPACE
from moetrt.ops.topk_routing import SPEC, RoutingVariant, onnx_function, topk_routing_reference
from moetrt.parity import check_close, tolerance
from tests.moetrt.test_topk_routing_v2 import _session as v2_session

ort = pytest.importorskip("onnxruntime")

TopKRouting = torch.ops.moetrt.TopKRouting
OPSET = 20

# (T tokens, E experts, k, scoring, selection bias, norm_min, scale); norm_min 0.5 with top-2 of 8 softmax
# scores clamps some rows and not others
CASES = [
    (41, 8, 2, "softmax", True, 0.5, 1.0),    # ERNIE-4.5: softmax, selection bias, clamp acting
    (23, 8, 2, "softmax", False, 0.5, 1.0),   # the clamp without a bias (the version-1 selection)
    (17, 6, 3, "sigmoid", True, 2.0, 2.5),    # sigmoid scores, a routed scale
    (0, 8, 2, "softmax", True, 0.5, 1.0),     # no tokens
    (5, 4, 4, "softmax", True, 1.5, 1.0),     # k = E: every row sums to 1 < norm_min
]


def _values(k, scoring, norm_min, scale, normalize=1):
    return {"k": k, "scoring": scoring, "normalize": normalize, "scale": float(scale), "norm_min": float(norm_min),
            "plugin_namespace": PLUGIN_NAMESPACE}


def _session(k, scoring, with_bias, norm_min, scale):
    """An ONNX Runtime session of one version-3 node with its function body (the version-2 tests' builder)."""
    assert SPEC.version_for(_values(k, scoring, norm_min, scale), ("selection_bias",) * with_bias) == 3
    return v2_session(k, scoring, True, float(scale), with_bias, 1, 1, "top2_sum", float(norm_min))


def _inputs(tokens, experts, seed=0):
    gen = np.random.default_rng(seed)
    logits = gen.standard_normal((tokens, experts)).astype(np.float32)
    bias = (gen.standard_normal(experts) * 0.1).astype(np.float32)
    return logits, bias


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-E{c[1]}-k{c[2]}-{c[3]}-bias{int(c[4])}-min{c[5]}")
def test_faces_agree_where_the_clamp_acts_and_where_not(case):
    tokens, experts, k, scoring, with_bias, norm_min, scale = case
    logits, bias = _inputs(tokens, experts)
    bias = bias if with_bias else None
    ref_w, ref_i = topk_routing_reference(logits, k, scoring, True, scale, bias, norm_min=norm_min)
    torch_bias = None if bias is None else torch.from_numpy(bias)
    faces = {
        "torch": [t.numpy() for t in TopKRouting(torch.from_numpy(logits), k, scoring, True, scale,
                                                 selection_bias=torch_bias, norm_min=norm_min)],
        "onnx": _session(k, scoring, with_bias, norm_min, scale).run(
            None, {"logits": logits} | ({} if bias is None else {"selection_bias": bias})),
    }
    for face, (weights, indices) in faces.items():
        np.testing.assert_array_equal(indices, ref_i, err_msg=f"{face} chose other experts")
        close = check_close(weights, ref_w, tolerance("fp32", "router_weights"))
        assert close.ok, f"{face} weights vs NumPy reference: {close}"
    if tokens:
        plain_w, plain_i = topk_routing_reference(logits, k, scoring, True, scale, bias)
        np.testing.assert_array_equal(plain_i, ref_i)  # norm_min never changes the choice
        sums = (plain_w / scale).sum(-1)  # 1 per row: the plain renormalisation
        raw = ref_w.sum(-1) / scale  # sum / max(sum, norm_min): below 1 exactly where the clamp acted
        clamped = raw < 1 - 1e-6
        assert np.allclose(sums, 1, atol=1e-6)
        if k < experts:
            assert clamped.any() and (~clamped).any(), "the case should clamp some rows and leave others"
        else:
            assert clamped.all()


def test_tiny_norm_min_is_the_plain_renormalisation():
    """Degenerate equivalence: a norm_min below k/E (ERNIE's released 1e-12) never clamps a softmax top-k sum
    (it is at least k/E), so the weights equal norm_min=0's bit for bit."""
    logits, bias = _inputs(257, 64, seed=3)
    logits_t, bias_t = torch.from_numpy(logits * 4), torch.from_numpy(bias)
    plain = TopKRouting(logits_t, 6, "softmax", True, 1.0, selection_bias=bias_t)
    tiny = TopKRouting(logits_t, 6, "softmax", True, 1.0, selection_bias=bias_t, norm_min=1e-12)
    assert torch.equal(plain[0], tiny[0]) and torch.equal(plain[1], tiny[1])
    ref = topk_routing_reference(logits * 4, 6, "softmax", True, 1.0, bias, norm_min=1e-12)
    np.testing.assert_array_equal(ref[0], topk_routing_reference(logits * 4, 6, "softmax", True, 1.0, bias)[0])
    out = _session(6, "softmax", True, 1e-12, 1.0).run(None, {"logits": logits * 4, "selection_bias": bias})
    np.testing.assert_array_equal(out[1], plain[1].numpy())


def test_norm_min_applies_only_with_normalize():
    """Without normalize the attribute does not apply: the node carries none and needs no newer version."""
    values = _values(2, "softmax", 0.3, 1.0, normalize=0)
    assert "norm_min" not in SPEC.non_default(values) and SPEC.version_for(values) == 1
    assert SPEC.version_for(_values(2, "softmax", 0.3, 1.0)) == 3
    assert SPEC.version_for(_values(2, "softmax", 0.0, 1.0)) == 1
    logits = torch.randn(9, 8, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(TopKRouting(logits, 2, "softmax", False, 1.0, norm_min=0.7),
                                                  TopKRouting(logits, 2, "softmax", False, 1.0)))


def test_version_1_and_2_bodies_are_unchanged_by_version_3():
    """The function bodies of nodes without norm_min hold no Max and no norm_min default (old exports stay equal)."""
    for variant in (RoutingVariant(), RoutingVariant(True, scoring="sigmoid"), RoutingVariant(True, 4)):
        proto = onnx_function(OPSET, variant)
        assert "Max" not in [n.op_type for n in proto.node]
        assert "norm_min" not in {a.name for a in proto.attribute_proto} | set(proto.attribute)
    proto = onnx_function(OPSET, RoutingVariant(True, norm_min=True))
    assert "Max" in [n.op_type for n in proto.node] and "norm_min" in {a.name for a in proto.attribute_proto}


def test_transformers_router_matches():
    """transformers' Ernie4_5_MoeTopKRouter: softmax, bias for choosing, weights / clamp(sum, min=moe_norm_min)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeTopKRouter

    config = transformers.Ernie4_5_MoeConfig(hidden_size=32, num_experts=8, num_experts_per_tok=2, moe_norm_min=0.3)
    router = Ernie4_5_MoeTopKRouter(config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        router.weight.copy_(torch.randn(8, 32, generator=gen) * 0.2)
        router.moe_statics.e_score_correction_bias.copy_(torch.randn(1, 8, generator=gen) * 0.1)
        x = torch.randn(50, 32, generator=gen)
        logits, ref_w, ref_i = router(x)
        weights, indices = TopKRouting(logits, 2, "softmax", True, 1.0,
                                       selection_bias=router.moe_statics.e_score_correction_bias.reshape(-1),
                                       norm_min=0.3)
    assert torch.equal(indices.long().sort(-1).values, ref_i.sort(-1).values)
    order = torch.argsort(ref_i, -1)  # compare weights expert by expert
    mine = weights.gather(-1, torch.argsort(indices.long(), -1))
    torch.testing.assert_close(mine, ref_w.gather(-1, order), rtol=1e-6, atol=1e-7)
    assert (ref_w.sum(-1) < 1 - 1e-4).any(), "the clamp should act on some tokens"


@pytest.mark.parametrize("bad", [-0.1, float("inf"), float("nan")])
def test_bad_norm_min_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="norm_min"):
        TopKRouting(torch.randn(3, 8), 2, "softmax", True, 1.0, norm_min=bad)
    with pytest.raises(ValueError, match="norm_min"):
        topk_routing_reference(np.zeros((3, 8), np.float32), 2, "softmax", True, 1.0, norm_min=bad)


def test_gradient_follows_the_clamp():
    """The op's backward differentiates weights / max(sum, norm_min): clamped rows get no gradient through the sum."""
    logits = torch.randn(31, 8, generator=torch.Generator().manual_seed(4)).requires_grad_()
    upstream = torch.randn(31, 2, generator=torch.Generator().manual_seed(5))
    weights, indices = TopKRouting(logits, 2, "softmax", True, 1.0, norm_min=0.5)
    (grad,) = torch.autograd.grad((weights * upstream).sum(), logits)
    leaf = logits.detach().requires_grad_()
    chosen = torch.softmax(leaf, -1).gather(-1, indices.long())
    want = chosen / chosen.sum(-1, keepdim=True).clamp(min=0.5)
    (want_grad,) = torch.autograd.grad((want * upstream).sum(), leaf)
    torch.testing.assert_close(grad, want_grad)
    clamped = chosen.sum(-1) < 0.5
    assert clamped.any() and (~clamped).any()
