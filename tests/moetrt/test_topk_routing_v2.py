"""``moetrt::TopKRouting`` version 2: the selection bias and group-limited routing (DeepSeek-V3 line).

Every face agrees: the torch op, the NumPy reference and the ONNX function body in ONNX Runtime, on
random logits with a bias that changes which experts win and groups that shut some out (both
asserted); the degenerate cases equal the version-1 op; transformers' ``DeepseekV3TopkRouter``
matches; bad attributes raise ValueErrors that name them; an export uses domain version 2 only
where a node needs it.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import moetrt.ops  # noqa: F401  (registers the torch ops)
from moetrt.ops._onnx import DOMAIN, PLUGIN_NAMESPACE
from moetrt.ops.topk_routing import (
    SPEC, RoutingVariant, onnx_function, routing_weights, selection_scores, topk_routing_reference,
)
from moetrt.parity import check_close, tolerance
from moetrt.parity.router import FAILURE, MATCH, classify

ort = pytest.importorskip("onnxruntime")

TopKRouting = torch.ops.moetrt.TopKRouting
OPSET = 20

# (T tokens, E experts, k, n_group, topk_group, group_scoring, scoring, normalize, scale)
CASES = [
    (33, 16, 4, 4, 2, "top2_sum", "sigmoid", True, 2.5),   # DeepSeek-V3 in small
    (17, 16, 4, 8, 3, "max", "sigmoid", False, 1.0),       # DeepSeek-V2's group scoring
    (9, 12, 3, 1, 1, "top2_sum", "sigmoid", True, 1.0),    # MiniMax-M2: bias, no groups
    (21, 8, 2, 4, 1, "top2_sum", "softmax", True, 1.0),    # softmax scores with groups
    (1, 6, 6, 3, 3, "max", "sigmoid", True, 1.0),          # k = E, every group kept
    (0, 8, 2, 2, 1, "top2_sum", "sigmoid", True, 1.0),     # no tokens
    (13, 6, 1, 6, 2, "max", "softmax", False, 0.5),        # groups of one expert
]


def _case_id(case):
    t, e, k, g, tg, gs, scoring, normalize, scale = case
    return f"T{t}-E{e}-k{k}-G{g}of{tg}-{gs}-{scoring}-n{int(normalize)}-s{scale}"


def _inputs(tokens, experts, seed=0, bias_scale=1.0):
    gen = np.random.default_rng(seed)
    logits = gen.standard_normal((tokens, experts)).astype(np.float32)
    # a bias on the scale of the scores' spread: it changes the winners of many tokens
    bias = (gen.standard_normal(experts) * 0.5 * bias_scale).astype(np.float32)
    return logits, bias


@functools.cache
def _session(k, scoring, normalize, scale, with_bias, n_group, topk_group, group_scoring, norm_min=0.0):
    values = {"k": k, "scoring": scoring, "normalize": int(normalize), "scale": scale, "n_group": n_group,
              "topk_group": topk_group, "group_scoring": group_scoring, "plugin_namespace": PLUGIN_NAMESPACE,
              "norm_min": norm_min}
    inputs = ["logits", "selection_bias"] if with_bias else ["logits"]
    node = helper.make_node("TopKRouting", inputs, ["weights", "indices"], domain=DOMAIN, **SPEC.non_default(values))
    infos = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["T", "E"])]
    if with_bias:
        infos.append(helper.make_tensor_value_info("selection_bias", TensorProto.FLOAT, ["E"]))
    graph = helper.make_graph(
        [node], "op", infos,
        [helper.make_tensor_value_info("weights", TensorProto.FLOAT, ["T", k]),
         helper.make_tensor_value_info("indices", TensorProto.INT32, ["T", k])])
    version = SPEC.version_for(values, ("selection_bias",) * with_bias)
    proto = helper.make_model(
        graph, functions=[onnx_function(OPSET, RoutingVariant(with_bias, n_group, group_scoring, scoring,
                                                              "norm_min" in SPEC.non_default(values)))],
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, version)])
    onnx.checker.check_model(proto, full_check=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _faces(logits, k, scoring, normalize, scale, bias=None, n_group=1, topk_group=1, group_scoring="top2_sum"):
    """{"torch" | "numpy" | "onnx": (weights, indices)} of one call."""
    options = dict(n_group=n_group, topk_group=topk_group, group_scoring=group_scoring)
    torch_bias = None if bias is None else torch.from_numpy(bias)
    out = {"torch": [t.numpy() for t in TopKRouting(torch.from_numpy(logits), k, scoring, normalize, scale,
                                                    selection_bias=torch_bias, **options)]}
    out["numpy"] = topk_routing_reference(logits, k, scoring, normalize, scale, bias, **options)
    feeds = {"logits": logits} if bias is None else {"logits": logits, "selection_bias": bias}
    out["onnx"] = _session(k, scoring, normalize, float(scale), bias is not None, n_group, topk_group,
                           group_scoring).run(None, feeds)
    return out


def _assert_same(faces, what=""):
    ref_w, ref_i = faces["numpy"]
    for face in ("torch", "onnx"):
        weights, indices = faces[face]
        assert weights.shape == ref_w.shape and indices.dtype == np.int32, f"{what} {face}: {weights.shape} {indices.dtype}"
        # random normal logits: no score is within an ulp of another, so the order is the reference's exactly
        np.testing.assert_array_equal(indices, ref_i, err_msg=f"{what} {face} chose other experts")
        close = check_close(weights, ref_w, tolerance("fp32", "router_weights"))
        assert close.ok, f"{what} {face} weights vs NumPy reference: {close}"


# --- every face agrees ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_faces_agree_with_bias_and_groups(case):
    tokens, experts, k, n_group, topk_group, group_scoring, scoring, normalize, scale = case
    logits, bias = _inputs(tokens, experts)
    faces = _faces(logits, k, scoring, normalize, scale, bias, n_group, topk_group, group_scoring)
    _assert_same(faces, _case_id(case))
    ref_w, ref_i = faces["numpy"]
    if tokens > 1 and k < experts:  # the bias and the groups do change the choice
        _, plain_i = topk_routing_reference(logits, k, scoring, normalize, scale)
        _, ungrouped_i = topk_routing_reference(logits, k, scoring, normalize, scale, bias)
        assert (np.sort(plain_i, -1) != np.sort(ungrouped_i, -1)).any(), "the bias chose no other expert"
        # with "max" and k <= topk_group the k best experts always lie in the kept groups
        if topk_group < n_group and (group_scoring == "top2_sum" or k > topk_group):
            assert (np.sort(ungrouped_i, -1) != np.sort(ref_i, -1)).any(), "the groups excluded no expert"
            size = experts // n_group
            groups_used = [len(set((row // size).tolist())) for row in ref_i]
            assert max(groups_used) <= topk_group
    if tokens:  # the weights are the unbiased scores of the chosen experts
        scores = torch.sigmoid(torch.from_numpy(logits)) if scoring == "sigmoid" else torch.softmax(
            torch.from_numpy(logits), -1)
        chosen = scores.gather(-1, torch.from_numpy(ref_i).long()).numpy()
        want = (chosen / chosen.sum(-1, keepdims=True) if normalize else chosen) * scale
        np.testing.assert_allclose(ref_w, want, rtol=1e-6, atol=1e-7)


def test_ties_go_to_the_lower_index_in_every_face():
    # exact ties between experts and between groups: the lower index (expert or group) wins
    logits = np.array([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                       [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0],
                       [0.0, 2.0, 2.0, 0.0, 0.0, 2.0, 2.0, 0.0]], np.float32)
    bias = np.zeros(8, np.float32)
    faces = _faces(logits, 2, "sigmoid", True, 1.0, bias, n_group=4, topk_group=2)
    for face, (_, indices) in faces.items():
        assert indices.tolist() == [[0, 1], [0, 1], [1, 2]], face
    faces = _faces(logits, 3, "sigmoid", True, 1.0, bias, n_group=2, topk_group=1, group_scoring="max")
    for face, (_, indices) in faces.items():
        assert indices.tolist() == [[0, 1, 2], [0, 1, 2], [1, 2, 0]], face


# --- degenerate equivalences ----------------------------------------------------------------------
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_degenerate_options_equal_the_version_1_op(scoring):
    logits, bias = _inputs(25, 16, seed=3)
    plain = _faces(logits, 3, scoring, True, 1.5)
    for face in ("torch", "numpy", "onnx"):
        w1, i1 = plain[face]
        variants = {
            "n_group 1": _faces(logits, 3, scoring, True, 1.5, n_group=1, topk_group=1)[face],
            "zero bias": _faces(logits, 3, scoring, True, 1.5, np.zeros(16, np.float32))[face],
            "topk_group == n_group": _faces(logits, 3, scoring, True, 1.5, n_group=4, topk_group=4)[face],
            "all three": _faces(logits, 3, scoring, True, 1.5, np.zeros(16, np.float32), 8, 8, "max")[face],
        }
        for what, (w2, i2) in variants.items():
            np.testing.assert_array_equal(i2, i1, err_msg=f"{face}: {what}")
            np.testing.assert_array_equal(w2, w1, err_msg=f"{face}: {what}")


def test_a_constant_bias_changes_nothing():
    logits, _ = _inputs(19, 8, seed=5)
    plain = TopKRouting(torch.from_numpy(logits), 2, "sigmoid", True, 1.0)
    shifted = TopKRouting(torch.from_numpy(logits), 2, "sigmoid", True, 1.0, selection_bias=torch.full((8,), 0.25))
    torch.testing.assert_close(shifted[1], plain[1], rtol=0, atol=0)
    torch.testing.assert_close(shifted[0], plain[0], rtol=0, atol=0)


# --- transformers' reference ------------------------------------------------------------------------
@pytest.mark.parametrize("n_group,topk_group,k,normalize,scale", [(4, 2, 4, True, 2.5), (8, 3, 6, False, 1.0),
                                                                  (1, 1, 3, True, 1.0)])
def test_matches_transformers_deepseek_v3_router(n_group, topk_group, k, normalize, scale):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    experts, hidden = 32, 24
    config = DeepseekV3Config(hidden_size=hidden, n_routed_experts=experts, num_experts_per_tok=k, n_group=n_group,
                              topk_group=topk_group, norm_topk_prob=normalize, routed_scaling_factor=scale)
    router = DeepseekV3TopkRouter(config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        router.weight.copy_(torch.randn(experts, hidden, generator=gen))
        router.e_score_correction_bias.copy_(torch.randn(experts, generator=gen) * 0.3)
    x = torch.randn(64, hidden, generator=gen)
    with torch.no_grad():
        logits, hf_weights, hf_indices = router(x)
        weights, indices = TopKRouting(logits, k, "sigmoid", normalize, scale,
                                       selection_bias=router.e_score_correction_bias, n_group=n_group,
                                       topk_group=topk_group)
    # transformers' top-k is unsorted: compare the chosen experts as sets and the weights by expert
    assert [sorted(r) for r in indices.tolist()] == [sorted(r) for r in hf_indices.tolist()]
    dense = torch.zeros(64, experts).scatter(1, indices.long(), weights)
    hf_dense = torch.zeros(64, experts).scatter(1, hf_indices, hf_weights)
    # NOTE: transformers adds 1e-20 to the normalizing sum; that and the summation order differ by ulps
    torch.testing.assert_close(dense, hf_dense, rtol=1e-6, atol=1e-6)


# --- autograd -------------------------------------------------------------------------------------------
def test_gradient_reaches_the_logits_through_the_unbiased_scores_only():
    logits, bias = _inputs(11, 16, seed=2)
    leaf = torch.from_numpy(logits).requires_grad_()
    bias_t = torch.from_numpy(bias).requires_grad_()
    weights, indices = TopKRouting(leaf, 3, "sigmoid", True, 2.0, selection_bias=bias_t, n_group=4, topk_group=2)
    grad = torch.randn_like(weights)
    got, bias_grad = torch.autograd.grad(weights, (leaf, bias_t), grad, allow_unused=True)
    assert bias_grad is None  # the bias only chooses
    check = torch.from_numpy(logits).requires_grad_()
    (want,) = torch.autograd.grad(routing_weights(check, indices, "sigmoid", True, 2.0), check, grad)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_selection_scores_are_minus_inf_outside_the_kept_groups():
    logits, bias = _inputs(7, 16, seed=4)
    scores = torch.sigmoid(torch.from_numpy(logits))
    sel = selection_scores(scores, torch.from_numpy(bias), 4, 2, "top2_sum")  # [T, E]
    finite = torch.isfinite(sel).view(7, 4, 4)  # [T, G, S]
    assert (finite.all(-1) | ~finite.any(-1)).all()  # whole groups in or out
    assert (finite.all(-1).sum(-1) == 2).all()  # topk_group of them in
    torch.testing.assert_close(sel[torch.isfinite(sel)], (scores + torch.from_numpy(bias))[torch.isfinite(sel)])


# --- errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(n_group=3), r"n_group \(3\) must divide the expert count E=8"),
    (dict(n_group=4, topk_group=5), r"topk_group must be in 1..n_group=4, got 5"),
    (dict(n_group=2, topk_group=0), r"'topk_group' must be a positive int"),
    (dict(n_group=0), r"'n_group' must be a positive int"),
    (dict(n_group=8, topk_group=2), r"'top2_sum' needs groups of >= 2 experts, got E=8 / n_group=8 = 1"),
    (dict(n_group=4, topk_group=1, k=3), r"k \(3\) exceeds the 2 experts of the topk_group=1 groups of 2"),
    (dict(n_group=2, group_scoring="mean"), r"'group_scoring' must be one of \('top2_sum', 'max'\)"),
    (dict(selection_bias=torch.zeros(7)), r"selection_bias must be float32 \[E=8\], got torch.float32 \[7\]"),
    (dict(selection_bias=torch.zeros(8, dtype=torch.float64)), r"selection_bias must be float32 \[E=8\]"),
])
def test_bad_attributes_raise_value_errors_naming_them(kwargs, match):
    kwargs = dict(kwargs)
    k = kwargs.pop("k", 2)
    logits = torch.zeros(3, 8)
    with pytest.raises(ValueError, match=match):
        TopKRouting(logits, k, "sigmoid", True, 1.0, **kwargs)
    with pytest.raises(ValueError, match=match):  # the fake (export's tracing) checks as the op does
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            fake = {n: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for n, v in kwargs.items()}
            TopKRouting(mode.from_tensor(logits), k, "sigmoid", True, 1.0, **fake)
    if "selection_bias" not in kwargs:
        with pytest.raises(ValueError, match=match):
            topk_routing_reference(logits.numpy(), k, "sigmoid", True, 1.0, **kwargs)


# --- hypothesis ------------------------------------------------------------------------------------------
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402


@st.composite
def grouped_cases(draw):
    n_group = draw(st.sampled_from([1, 2, 3, 4]), label="n_group")
    size = draw(st.integers(2, 4), label="group size")
    topk_group = draw(st.integers(1, n_group), label="topk_group")
    k = draw(st.integers(1, topk_group * size), label="k")
    tokens = draw(st.integers(0, 12), label="T")
    grid = draw(st.booleans(), label="integer grid (exact ties)")
    elements = st.integers(-3, 3).map(float) if grid else st.floats(-6.0, 6.0, width=32)
    logits = draw(hnp.arrays(np.float32, (tokens, n_group * size), elements=elements), label="logits")
    bias = draw(hnp.arrays(np.float32, (n_group * size,), elements=st.sampled_from([0.0, 0.25, -0.5, 1.0])),
                label="bias") if draw(st.booleans(), label="with bias") else None
    return logits, bias, k, n_group, topk_group, grid


def _dense(weights, indices, experts):
    """[T, K] -> [T, E] (0 where not chosen): independent of the order of the k slots."""
    out = np.zeros((weights.shape[0], experts))
    np.put_along_axis(out, indices.astype(np.int64), weights.astype(np.float64), axis=-1)
    return out


def test_faces_agree_property(property_settings):
    @property_settings(ci=60, slow=600)
    @given(case=grouped_cases(), scoring=st.sampled_from(["softmax", "sigmoid"]),
           group_scoring=st.sampled_from(["top2_sum", "max"]), normalize=st.booleans())
    def check(case, scoring, group_scoring, normalize):
        logits, bias, k, n_group, topk_group, grid = case
        options = dict(n_group=n_group, topk_group=topk_group, group_scoring=group_scoring)
        faces = _faces(logits, k, scoring, normalize, 1.0, bias, **options)
        ref_w, ref_i = faces["numpy"]
        weight_tol = tolerance("fp32", "router_weights")
        for face in ("torch", "onnx"):
            weights, indices = faces[face]
            if grid:  # exact ties (of experts and of groups) go to the lower index: the same choice, same order
                np.testing.assert_array_equal(indices, ref_i, err_msg=f"{face} breaks exact ties differently")
                close = check_close(weights, ref_w, weight_tol)
            else:  # the faces' scores differ by ulps: a different choice only where the selection scores nearly tie
                status, gaps = classify(logits, ref_i, indices, scoring=scoring, selection_bias=bias,
                                        gap_tolerance=tolerance("fp32", "router_gap").atol, **options)
                bad = np.flatnonzero(status == FAILURE)
                assert not bad.size, f"{face} routes tokens {bad.tolist()} differently (gaps {gaps[bad].tolist()})"
                same = status == MATCH
                close = check_close(_dense(weights, indices, logits.shape[1])[same],
                                    _dense(ref_w, ref_i, logits.shape[1])[same], weight_tol)
            assert close.ok, f"{face} weights vs NumPy reference: {close}"

    check()


# --- export -----------------------------------------------------------------------------------------------
def test_export_uses_domain_version_2_only_where_a_node_needs_it(tmp_path):
    from moetrt.config import MoEConfig
    from moetrt.export.onnx_from_torch import onnx_from_torch
    from moetrt.model import MoETransformer

    cfg = MoEConfig.from_name("tiny", num_hidden_layers=2, scoring="sigmoid", selection_bias=True, n_group=4,
                              topk_group=2)
    torch.manual_seed(0)
    model = MoETransformer(cfg).eval()
    with torch.no_grad():
        for i in cfg.moe_layers:
            model.get_parameter(f"layers.{i}.mlp.selection_bias").copy_(torch.randn(cfg.num_experts) * 0.3)
    out = onnx_from_torch(model, tmp_path / "v2", router_outputs=True, progress=False)
    proto = onnx.load(str(out / "model.onnx"))
    assert {o.domain: o.version for o in proto.opset_import}[DOMAIN] == 2
    routers = [n for n in proto.graph.node if n.op_type == "TopKRouting"]
    assert len(routers) == len(cfg.moe_layers)
    for node in routers:
        assert len(node.input) == 2 and node.input[1].endswith("mlp.selection_bias")
        assert {a.name: helper.get_attribute_value(a) for a in node.attribute}.items() >= {
            "n_group": 4, "topk_group": 2}.items()
        assert "group_scoring" not in {a.name for a in node.attribute}  # its default is not written
    (function,) = [f for f in proto.functions if f.name == "TopKRouting"]
    assert list(function.input) == ["logits", "selection_bias"]

    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    with torch.no_grad():
        ref = model(ids, output_router=True)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((2, 7), np.int64),
             "position_ids": np.arange(7)[None].repeat(2, 0)}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values"):
            shape = [2 if d == "batch_size" else 0 if isinstance(d, str) else d for d in value.shape]
            feeds[value.name] = np.zeros(shape, np.float32)
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    for n, layer in enumerate(cfg.moe_layers):
        np.testing.assert_array_equal(outputs[f"router_indices.{layer}"], ref.router_indices[n].numpy())
