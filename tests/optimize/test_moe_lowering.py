"""lower_moe: the moetrt pair becomes com.microsoft::MoE (alone, or behind an If on T), and the
lowered graph computes what the PyTorch reference computes, on tiny and on each family."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import moetrt
from moetrt.optimize.moe_lowering import interleave_gate_up, lower_moe
from tests.optimize.helpers import apply_pass, compare, node_counts, session

pytest.importorskip("onnxruntime")

# (batch, new tokens, past): T = batch * new tokens; tiny has E=8, K=2, so T <= 4 takes the fused op under "auto"
SHAPES = [(1, 1, 0), (1, 1, 37), (4, 1, 13), (1, 4, 0), (1, 5, 0), (3, 17, 0), (2, 9, 20), (1, 256, 0)]
FAMILY_VARIANTS = ["mixtral", "qwen2_moe-shared", "qwen3_moe", "olmoe"]
FAMILY_SHAPES = [(1, 1, 0), (2, 1, 7), (2, 9, 20)]


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
    assert result.count == len(model.config.moe_layers) and not result.skipped
    assert node_counts(graph)["com.microsoft::MoE"] == len(model.config.moe_layers)
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


@pytest.mark.parametrize("overrides,reason", [
    (dict(scoring="sigmoid"), "scoring 'sigmoid'"),
    (dict(routed_scaling_factor=2.5), "scale 2.5"),
])
def test_layers_the_fused_op_cannot_compute_keep_their_body(canonical, tmp_path, overrides, reason):
    model, folder = canonical(_random_config(**overrides))
    result, graph = apply_pass(folder, tmp_path / "model.onnx", lower_moe, policy="always")
    assert result.count == 0
    assert len(result.skipped) == 2 and all(reason in why for why in result.skipped.values()), result.skipped
    counts = node_counts(graph)
    assert counts["moetrt::SparseMoE"] == 2 and counts["com.microsoft::MoE"] == 0
    logits, kv, _ = compare(model, session(tmp_path / "model.onnx"), 2, 7, 3)
    assert logits.ok and kv.ok


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
