"""lower_moe: the moetrt pair becomes com.microsoft::MoE (alone, or behind an If on T), and the
lowered graph computes what the PyTorch reference computes, on tiny and on each family."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import moetrt
from moetrt.optimize.moe_lowering import interleave_gate_up, lower_moe
from moetrt.parity import check_close, tolerance
from tests.optimize.helpers import apply_pass, compare, node_counts, session

pytest.importorskip("onnxruntime")

# (batch, new tokens, past): T = batch * new tokens; tiny has E=8, K=2, so T <= 4 takes the fused op under "auto"
SHAPES = [(1, 1, 0), (1, 1, 37), (4, 1, 13), (1, 4, 0), (1, 5, 0), (3, 17, 0), (2, 9, 20), (1, 256, 0)]
FAMILY_VARIANTS = [
    "mixtral", "qwen2_moe-shared", "qwen3_moe", "olmoe", "deepseek_v3", "glm4_moe", "glm4_moe_lite", "minimax_m2",
]
FAMILY_SHAPES = [(1, 1, 0), (2, 1, 7), (2, 9, 20)]
# sigmoid scoring with a selection bias (and groups, but for minimax_m2): the log-weights path
LOG_WEIGHTS_VARIANTS = ("deepseek_v3", "glm4_moe", "glm4_moe_lite", "minimax_m2")


@pytest.fixture(scope="module")
def lowered(canonical, tmp_path_factory):
    """(variant, policy, export options) -> (reference, PassResult, lowered model, session), cached."""
    cache = {}

    def get(variant, policy="auto", **options):
        key = (repr(variant), policy, tuple(sorted(options.items())))
        if key not in cache:
            model, folder = canonical(variant, **options)
            path = tmp_path_factory.mktemp("lowered") / "model.onnx"
            result, graph = apply_pass(folder, path, lower_moe, policy=policy)
            cache[key] = (model, result, graph, session(path))
        return cache[key]

    return get


def test_interleave_gate_up():
    w = np.arange(2 * 6 * 3, dtype=np.float32).reshape(2, 6, 3)  # E=2, F=3, D=3: gate rows 0-2, up rows 3-5
    out = interleave_gate_up(w)
    for e in range(2):
        for f in range(3):
            np.testing.assert_array_equal(out[e, 2 * f], w[e, f])  # gate row f
            np.testing.assert_array_equal(out[e, 2 * f + 1], w[e, 3 + f])  # up row f


def test_always_replaces_every_layer(lowered):
    model, result, graph, _ = lowered("tiny", "always")
    layers = len(model.config.moe_layers)
    counts = node_counts(graph)
    assert result.count == layers and not result.skipped
    assert counts["com.microsoft::MoE"] == layers
    assert counts["moetrt::SparseMoE"] == 0 and counts["moetrt::TopKRouting"] == 0 and counts["If"] == 0
    assert not graph.functions, "the unused function bodies must be dropped"
    assert graph.opset_imports["com.microsoft"] == 1
    for node in ir.traversal.RecursiveGraphIterator(graph.graph):
        if node.op_type == "MoE":
            attrs = {k: a.value for k, a in node.attributes.items()}
            assert attrs["swiglu_fusion"] == 1 and attrs["activation_type"] == "swiglu"
            assert attrs["activation_alpha"] == 1.0 and attrs["activation_beta"] == 0.0
            assert attrs["k"] == model.config.num_experts_per_tok
            assert attrs["normalize_routing_weights"] == int(model.config.normalize_topk)
            assert node.inputs[1].producer().op_type == "Gemm", "the router input must be the logits"


def test_auto_takes_the_fused_op_for_decode_steps_only(lowered):
    model, result, graph, _ = lowered("tiny", "auto")
    layers = len(model.config.moe_layers)
    counts = node_counts(graph)
    assert result.count == layers
    assert counts["If"] == layers and counts["com.microsoft::MoE"] == layers and counts["moetrt::SparseMoE"] == layers
    main = node_counts(graph, recursive=False)
    assert main["moetrt::SparseMoE"] == 0 and main["com.microsoft::MoE"] == 0
    for node in graph.graph:
        if node.op_type == "If":
            then_ops = [n.op_type for n in node.attributes["then_branch"].value]
            else_ops = [n.op_type for n in node.attributes["else_branch"].value]
            assert then_ops == ["MoE"] and else_ops == ["SparseMoE"]
            threshold = node.inputs[0].producer().inputs[1].producer().attributes["value"].as_tensor().numpy()
            assert threshold.tolist() == [model.config.num_experts // model.config.num_experts_per_tok]
    # the expert weights are stored once: no interleaved copy among the initializers
    assert not [name for name in graph.graph.initializers if "interleaved" in name]


@pytest.mark.parametrize("policy", ["auto", "always"])
@pytest.mark.parametrize("batch,seq,past", SHAPES)
def test_tiny_matches_reference(lowered, record_max, policy, batch, seq, past):
    model, _, _, sess = lowered("tiny", policy)
    logits, kv, _ = compare(model, sess, batch, seq, past)
    record_max("lower_moe fp32 max abs error (tiny logits)", f"{policy} b{batch} s{seq} p{past}", logits.max_abs)
    assert logits.ok, f"logits: {logits}"
    assert kv.ok, f"present KV: {kv}"


@pytest.mark.parametrize("variant", FAMILY_VARIANTS)
def test_families_lowered_and_match_reference(lowered, record_max, variant):
    model, result, graph, sess = lowered(variant, "auto")
    layers = len(model.config.moe_layers)
    assert result.count == layers and not result.skipped
    counts = node_counts(graph)
    assert counts["com.microsoft::MoE"] == layers
    # auto keeps TopKRouting for the function-body branch in any case; the fused op's router input tells the paths
    assert counts["moetrt::TopKRouting"] == layers and "TopKRouting" in {f.name for f in graph.functions.values()}
    log_weights = variant in LOG_WEIGHTS_VARIANTS  # ORT's softmax routing cannot compute theirs: the node routes
    for node in ir.traversal.RecursiveGraphIterator(graph.graph):
        if node.op_type == "MoE":
            router = node.inputs[1].producer().op_type
            assert (router == "ScatterElements") == log_weights, (variant, router)  # log(weights), or the logits
    for batch, seq, past in FAMILY_SHAPES:
        logits, kv, _ = compare(model, sess, batch, seq, past, seed=batch * 100 + seq)
        record_max("lower_moe fp32 max abs error (families logits)", variant, logits.max_abs)
        assert logits.ok, f"{variant} b{batch} s{seq} p{past} logits: {logits}"
        assert kv.ok, f"{variant} b{batch} s{seq} p{past} present KV: {kv}"


def test_router_outputs_keep_their_router(lowered):
    """With router outputs the TopKRouting node stays for them; the experts are lowered all the same."""
    model, result, graph, sess = lowered("tiny", "always", router_outputs=True)
    counts = node_counts(graph)
    assert result.count == 4 and counts["com.microsoft::MoE"] == 4 and counts["moetrt::TopKRouting"] == 4
    assert counts["moetrt::SparseMoE"] == 0
    logits, _, got = compare(model, sess, 2, 11, 0, pad=False)
    assert logits.ok, str(logits)
    assert got["router_indices.0"].dtype == np.int32


def _random_config(**overrides):
    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                num_experts=4, num_experts_per_tok=2, intermediate_size=24, max_position_embeddings=128)
    return moetrt.MoEConfig(**{**base, **overrides})


# routings ORT's softmax cannot compute: the log-weights path (TopKRouting kept, log(weights) into MoE)
LOG_WEIGHTS_ROUTINGS = {
    "sigmoid": dict(scoring="sigmoid"),
    "scale": dict(routed_scaling_factor=2.5),
    "sigmoid-unnormalized-scale": dict(scoring="sigmoid", normalize_topk=False, routed_scaling_factor=1.5),
    "deepseek": dict(scoring="sigmoid", selection_bias=True, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                     num_experts=8, num_experts_per_tok=3),
    "bias-softmax-max-groups": dict(selection_bias=True, n_group=4, topk_group=2, group_scoring="max",
                                    normalize_topk=False, num_experts=8),
    # ERNIE-4.5: softmax, a selection bias, the renormalisation clamped (TopKRouting version 3: its rows sum below 1)
    "ernie-norm-min": dict(selection_bias=True, norm_min=0.3, num_experts=8),
}
# T=1 decode, T=37 prefill, batch 3 (decode and prefill): shapes the graph was not exported with
LOG_WEIGHTS_SHAPES = [(1, 1, 0), (1, 1, 6), (1, 37, 0), (3, 1, 9), (3, 37, 0)]


@pytest.fixture(scope="module")
def log_weights_model(canonical):
    """routing name -> (reference with a random selection bias, exported folder)."""
    import torch

    cache = {}

    def get(name):
        if name not in cache:
            model, folder = canonical(_random_config(**LOG_WEIGHTS_ROUTINGS[name]))
            bias = [layer.mlp.selection_bias for layer in model.layers if getattr(layer.mlp, "selection_bias", None)
                    is not None]
            assert not bias or all(torch.count_nonzero(b) for b in bias), "the export must see a non-zero bias"
            cache[name] = (model, folder)
        return cache[name]

    return get


@pytest.mark.parametrize("policy", ["auto", "always"])
@pytest.mark.parametrize("name", list(LOG_WEIGHTS_ROUTINGS))
def test_routings_ort_cannot_compute_take_the_log_weights_path(log_weights_model, tmp_path, record_max, name,
                                                                policy):
    model, folder = log_weights_model(name)
    result, graph = apply_pass(folder, tmp_path / "model.onnx", lower_moe, policy=policy)
    assert result.count == 2 and not result.skipped, result.skipped
    counts = node_counts(graph)
    assert counts["com.microsoft::MoE"] == 2 and counts["moetrt::TopKRouting"] == 2
    assert counts["moetrt::SparseMoE"] == (2 if policy == "auto" else 0)
    assert "TopKRouting" in {f.name for f in graph.functions.values()}, "the kept router needs its function body"
    for node in ir.traversal.RecursiveGraphIterator(graph.graph):
        if node.op_type == "MoE":
            assert node.attributes["normalize_routing_weights"].value == 1
            assert node.inputs[1].producer().op_type == "ScatterElements"
            assert node.inputs[1].producer().inputs[2].producer().op_type == "Log"
    sess, canonical_sess = session(tmp_path / "model.onnx"), session(folder / "model.onnx")
    for batch, seq, past in LOG_WEIGHTS_SHAPES:
        logits, kv, got = compare(model, sess, batch, seq, past, seed=seq)
        record_max("lower_moe log-weights path fp32 max abs error (logits)", f"{name} {policy} b{batch} s{seq} p{past}",
                   logits.max_abs)
        assert logits.ok and kv.ok, (batch, seq, past, logits, kv)
        _, _, body = compare(model, canonical_sess, batch, seq, past, seed=seq)  # the canonical export
        assert check_close(got["logits"], body["logits"], tolerance("fp32", "logits")).ok


def test_a_routing_no_path_computes_keeps_its_body(canonical, tmp_path):
    """scale <= 0 has no log: refused with the reason, the body kept."""
    _, folder = canonical(_random_config(scoring="sigmoid"))
    model = ir.load(folder / "model.onnx")
    for node in model.graph:
        if node.op_type == "TopKRouting":
            node.attributes["scale"] = ir.AttrFloat32("scale", -1.0)
    result = lower_moe(model, policy="always")
    assert result.count == 0 and len(result.skipped) == 2, result.skipped
    assert all("scale -1: the log-weights path" in why for why in result.skipped.values()), result.skipped
    assert node_counts(model)["moetrt::SparseMoE"] == 2 and node_counts(model)["com.microsoft::MoE"] == 0


@pytest.mark.parametrize("num_experts,k", [(4, 4), (1, 1), (8, 3)])
def test_routing_edge_cases(canonical, lowered, num_experts, k):
    """k = E (the dense mixture), one expert top-1 (a dense FFN), top-3; decode and prefill."""
    cfg = _random_config(num_experts=num_experts, num_experts_per_tok=k)
    for policy in ("auto", "always"):
        model, result, _, sess = lowered(cfg, policy)
        assert result.count == 2
        for batch, seq, past in [(1, 1, 0), (1, 1, 5), (2, 40, 0), (3, 2, 1)]:
            logits, kv, _ = compare(model, sess, batch, seq, past)
            assert logits.ok and kv.ok, (policy, batch, seq, past, logits, kv)


def test_dtype_the_target_does_not_run_is_skipped(canonical, tmp_path):
    """The CPU target runs the fused op in float32 only: a float16 graph keeps its bodies."""
    _, folder = canonical(_random_config(num_experts=4, num_experts_per_tok=4))
    result, _ = apply_pass(folder, tmp_path / "model.onnx", lower_moe, (ir.DataType.FLOAT16,))
    assert result.count == 0 and all("float" in why for why in result.skipped.values()), result.skipped


def test_unknown_policy():
    with pytest.raises(ValueError, match="policy must be one of auto, always"):
        lower_moe(ir.Model(ir.Graph([], [], nodes=[]), ir_version=10), policy="sometimes")


# --- gpt-oss's experts: clamped SwiGLU with expert biases ------------------------------------------------
# com.microsoft::MoE's SwiGLU (ONNX Runtime 1.32's op schema and CPU kernel, contrib_ops/cpu/moe):
#   g, l = fc1 rows 2i, 2i+1 + fc1_experts_bias;  G = min(g, swiglu_limit);  L = clamp(l, +-swiglu_limit)
#   h = G * sigmoid(activation_alpha * G) * (L + activation_beta);  out = fc2 h + fc2_experts_bias
# which is SparseMoE's clamped_swiglu with activation_beta = 1 (the "+ 1" on up). Checked below against the
# op's NumPy reference on weights large enough that both clamps fire.
LAYER = dict(num_experts=8, dim=64, ffn=96, k=2)
BIASES = [("b_gate_up", "b_down"), ("b_gate_up",), ("b_down",), ()]
LAYER_TOKENS = (1, 3, 7, 64)  # decode-sized (T * K <= E) and prefill-sized steps


def hand_built_layer(path, num_experts=8, dim=64, ffn=96, k=2, *, activation="clamped_swiglu", alpha=1.702,
                     limit=7.0, biases=("b_gate_up", "b_down"), seed=0, std=0.5, extra_attributes=None) -> dict:
    """One gpt-oss-style MoE layer x [T, D] -> y [T, D] as the export writes it, built by hand.

    The router is a MatMul + Add (gpt-oss's router bias) before ``TopKRouting`` (softmax,
    normalize=1); ``SparseMoE`` takes the ``biases`` named and the ``activation`` attributes; the
    model-local function bodies are attached as the export attaches them. ``std`` 0.5 makes
    the gate/up pre-activations exceed ``limit`` on some rows, so the clamps are exercised.
    ``extra_attributes`` go on the SparseMoE node (to test refusals). Returns the weights.
    """
    from onnx import TensorProto, helper, numpy_helper

    from moetrt.export.onnx_from_torch import attach_functions
    from moetrt.ops.sparse_moe import SPEC as SPARSE_MOE
    from moetrt.ops.topk_routing import SPEC as TOPK_ROUTING

    rng = np.random.default_rng(seed)
    E, D, F = num_experts, dim, ffn
    weights = {
        "w_router": rng.standard_normal((D, E)).astype(np.float32) * 0.3,  # [D, E]
        "b_router": rng.standard_normal(E).astype(np.float32) * 0.3,
        "w_gate_up": rng.standard_normal((E, 2 * F, D)).astype(np.float32) * std,
        "w_down": rng.standard_normal((E, D, F)).astype(np.float32) * 0.1,
        "b_gate_up": rng.standard_normal((E, 2 * F)).astype(np.float32),
        "b_down": rng.standard_normal((E, D)).astype(np.float32),
    }
    for name in {"b_gate_up", "b_down"} - set(biases):
        weights[name] = None
    router_attrs = TOPK_ROUTING.non_default({"k": k, "normalize": 1, "plugin_namespace": "moetrt"})
    expert_attrs = SPARSE_MOE.non_default({"activation": activation, "alpha": alpha, "limit": limit,
                                           "plugin_namespace": "moetrt"})
    expert_inputs = ["x", "weights", "indices", "w_gate_up", "w_down",
                     "b_gate_up" if "b_gate_up" in biases else "", "b_down" if "b_down" in biases else ""]
    while not expert_inputs[-1]:
        expert_inputs.pop()
    nodes = [
        helper.make_node("MatMul", ["x", "w_router"], ["router_mm"], name="router_matmul"),
        helper.make_node("Add", ["router_mm", "b_router"], ["logits"], name="router_bias"),
        helper.make_node("TopKRouting", ["logits"], ["weights", "indices"], name="router", domain="moetrt",
                         **router_attrs),
        helper.make_node("SparseMoE", expert_inputs, ["y"], name="experts", domain="moetrt", **expert_attrs),
    ]
    graph = helper.make_graph(
        nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", D])],
        [numpy_helper.from_array(w, name) for name, w in weights.items() if w is not None],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("moetrt", 1)],
                              ir_version=10)
    model = ir.from_proto(onnx_shape_inferred(model))
    attach_functions(model, E)
    experts = next(node for node in model.graph if node.op_type == "SparseMoE")
    for name, value in (extra_attributes or {}).items():  # after the bodies, which read the spec's attributes only
        experts.attributes[name] = ir.convenience.convert_attribute(name, value)
    ir.save(model, path)
    return weights


def onnx_shape_inferred(model):
    """``model`` with the value shapes the export records (the passes read x's dtype and rank)."""
    import onnx

    from moetrt.ops._onnx import registered_schemas
    from moetrt.ops.sparse_moe import onnx_schema as sparse_moe_schema
    from moetrt.ops.topk_routing import onnx_schema as topk_routing_schema

    with registered_schemas([topk_routing_schema(), sparse_moe_schema()]):
        return onnx.shape_inference.infer_shapes(model)


def layer_reference(weights: dict, x: np.ndarray, k: int = 2, activation="clamped_swiglu", alpha=1.702,
                    limit=7.0, w_gate_up=None, w_down=None) -> np.ndarray:
    """The layer through the ops' NumPy references (float64 inside); ``w_gate_up`` / ``w_down`` replace the
    layer's weights (the dequantized ones of a quantized layer)."""
    from moetrt.ops.sparse_moe import sparse_moe_reference
    from moetrt.ops.topk_routing import topk_routing_reference

    logits = x.astype(np.float64) @ weights["w_router"] + weights["b_router"]
    routing, indices = topk_routing_reference(logits, k, "softmax", normalize=True)
    return sparse_moe_reference(
        x, routing, indices, weights["w_gate_up"] if w_gate_up is None else w_gate_up,
        weights["w_down"] if w_down is None else w_down, weights["b_gate_up"], weights["b_down"],
        activation, alpha, limit)


def clamped_fraction(weights: dict, x: np.ndarray, limit: float) -> tuple[float, float]:
    """Fractions of gate pre-activations above ``limit`` and of up ones outside +-limit (over all experts)."""
    gate_up = np.einsum("efd,td->tef", weights["w_gate_up"], x)  # [T, E, 2F]
    if weights["b_gate_up"] is not None:
        gate_up = gate_up + weights["b_gate_up"]
    ffn = gate_up.shape[-1] // 2
    return float((gate_up[..., :ffn] > limit).mean()), float((np.abs(gate_up[..., ffn:]) > limit).mean())


@pytest.fixture(scope="module")
def gpt_oss_layer(tmp_path_factory):
    """(biases, activation, alpha, limit, policy) -> (weights, PassResult, lowered model, session), cached."""
    cache = {}

    def get(biases=("b_gate_up", "b_down"), activation="clamped_swiglu", alpha=1.702, limit=7.0, policy="always"):
        key = (biases, activation, alpha, limit, policy)
        if key not in cache:
            folder = tmp_path_factory.mktemp("gpt-oss-layer")
            weights = hand_built_layer(folder / "layer.onnx", **LAYER, activation=activation, alpha=alpha, limit=limit,
                                       biases=biases)
            result, graph = apply_pass(folder / "layer.onnx", folder / "lowered.onnx", lower_moe, policy=policy)
            cache[key] = (weights, result, graph, session(folder / "lowered.onnx"), session(folder / "layer.onnx"))
        return cache[key]

    return get


def _moe_node(graph):
    nodes = [n for n in ir.traversal.RecursiveGraphIterator(graph.graph) if n.op_type == "MoE"]
    assert len(nodes) == 1, nodes
    return nodes[0]


@pytest.mark.parametrize("biases", BIASES)
def test_clamped_swiglu_lowers_to_moe_with_its_attributes_and_biases(gpt_oss_layer, biases):
    weights, result, graph, _, _ = gpt_oss_layer(biases, alpha=1.5, limit=3.0)
    assert result.count == 1 and not result.skipped, result.skipped
    counts = node_counts(graph)
    assert counts["com.microsoft::MoE"] == 1 and counts["moetrt::SparseMoE"] == 0
    node = _moe_node(graph)
    attrs = {k: a.value for k, a in node.attributes.items()}
    assert attrs == dict(k=2, normalize_routing_weights=1, activation_type="swiglu", swiglu_fusion=1,
                         activation_alpha=1.5, activation_beta=1.0, swiglu_limit=3.0)
    inputs = list(node.inputs) + [None] * 6
    assert inputs[1].producer().op_type == "Add", "the router input must be the logits (after the router bias)"
    fc1_bias, fc2_bias = inputs[3], inputs[5]
    if "b_gate_up" in biases:  # interleaved like fc1: rows g0, u0, g1, u1, ...
        np.testing.assert_array_equal(fc1_bias.const_value.numpy(),
                                      interleave_gate_up(weights["b_gate_up"][:, :, None])[:, :, 0])
    else:
        assert fc1_bias is None
    assert (fc2_bias is not None) == ("b_down" in biases)


@pytest.mark.parametrize("alpha,limit", [(1.702, 7.0), (1.5, 3.0)])
@pytest.mark.parametrize("biases", BIASES)
def test_clamped_swiglu_matches_the_reference(gpt_oss_layer, record_max, biases, alpha, limit):
    """com.microsoft::MoE computes SparseMoE's clamped_swiglu exactly (both clamps firing), with every bias combination."""
    weights, _, _, lowered_sess, canonical_sess = gpt_oss_layer(biases, alpha=alpha, limit=limit)
    for tokens in LAYER_TOKENS:
        x = np.random.default_rng(tokens).standard_normal((tokens, LAYER["dim"])).astype(np.float32)
        want = layer_reference(weights, x, alpha=alpha, limit=limit)
        got = lowered_sess.run(None, {"x": x})[0]
        body = canonical_sess.run(None, {"x": x})[0]  # the canonical model's function body
        rel = float(np.abs(got - want).max() / np.abs(want).max())
        record_max("lower_moe clamped_swiglu one layer: max |error| / max |reference|", f"{biases} a{alpha} l{limit}",
                   rel)
        assert rel < 1e-5, (tokens, rel)  # fp32 GEMMs over D=64 / F=96: ~1e-7 measured
        assert np.abs(got - body).max() / np.abs(want).max() < 1e-5, tokens
    gate, up = clamped_fraction(weights, np.random.default_rng(64).standard_normal((64, LAYER["dim"])), limit)
    assert gate > 0.01 and up > 0.01, "the test needs pre-activations past the limit to check the clamps"


def test_clamped_swiglu_auto_policy(gpt_oss_layer):
    """auto: the fused op behind If(T * K <= E) for decode steps, the function body otherwise; both match."""
    weights, result, graph, sess, _ = gpt_oss_layer(policy="auto")
    assert result.count == 1
    counts = node_counts(graph)
    assert counts["If"] == 1 and counts["com.microsoft::MoE"] == 1 and counts["moetrt::SparseMoE"] == 1
    node = _moe_node(graph)
    assert node.attributes["swiglu_limit"].value == 7.0 and node.attributes["activation_beta"].value == 1.0
    assert len(node.inputs) == 6 and node.inputs[3] is not None and node.inputs[5] is not None
    for tokens in LAYER_TOKENS:
        x = np.random.default_rng(tokens).standard_normal((tokens, LAYER["dim"])).astype(np.float32)
        want = layer_reference(weights, x)
        assert np.abs(sess.run(None, {"x": x})[0] - want).max() / np.abs(want).max() < 1e-5, tokens


def test_silu_with_biases_lowers(gpt_oss_layer):
    """silu keeps alpha=1, beta=0 and no limit, with the biases passed as they are."""
    weights, result, graph, sess, _ = gpt_oss_layer(activation="silu")
    assert result.count == 1
    node = _moe_node(graph)
    attrs = {k: a.value for k, a in node.attributes.items()}
    assert attrs["activation_alpha"] == 1.0 and attrs["activation_beta"] == 0.0 and "swiglu_limit" not in attrs
    x = np.random.default_rng(0).standard_normal((9, LAYER["dim"])).astype(np.float32)
    want = layer_reference(weights, x, activation="silu")
    assert np.abs(sess.run(None, {"x": x})[0] - want).max() / np.abs(want).max() < 1e-5


@pytest.mark.parametrize("options,reason", [
    (dict(limit=-1.0), "implements limit in (), the node has limit=-1.0"),
    (dict(extra_attributes={"beta": 1.0}), "unknown attribute 'beta'"),
])
def test_what_no_lowering_declares_keeps_the_body(tmp_path, options, reason):
    """Reject by default: an attribute value or an attribute the lowering does not declare is refused, with why."""
    hand_built_layer(tmp_path / "layer.onnx", **LAYER, **options)
    for policy in ("auto", "always"):
        result, graph = apply_pass(tmp_path / "layer.onnx", tmp_path / "lowered.onnx", lower_moe, policy=policy)
        assert result.count == 0 and list(result.skipped) == ["experts"], result.skipped
        assert reason in result.skipped["experts"], result.skipped
        assert node_counts(graph)["moetrt::SparseMoE"] == 1 and node_counts(graph)["com.microsoft::MoE"] == 0
