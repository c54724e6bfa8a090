"""DBRX through every stage: the routing against transformers' own ``route_tokens_to_experts`` (p = 1, 2, None),
greedy tokens on torch and ort equal transformers' ``generate``, each feature exercised, ``optimize --target
ort-cpu``, the streamed export (one expert's block of ``w1`` / ``v1`` / ``w2`` read at a time), save, refusals.

The tiny ``dbrx`` variant turns every feature on: the Euclidean norm of the top-k weights
(``moe_normalize_expert_weights=2``), ``clip_qkv`` 0.6 (clamps a share of the fused q/k/v values), 2 key/value
heads for 4 query heads, LayerNorm without bias, RoPE base 500000; ``dbrx-sum`` is the released models' routing
(p=1). ``tests/moetrt/test_hf_parity.py`` (logits: full forward, prefill + decode, left-padded; saved and sharded
folders), ``tests/export/test_onnx_from_torch.py`` (export -> ORT) and ``tests/optimize/test_trt_rtx.py``
(TensorRT-RTX build) run the variants through their shape tables too.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import moetrt
from moetrt.errors import UnsupportedModelError
from tests.hf_tiny import hf_forward, hf_tiny_model, rel_err
from tests.moetrt.family_checks import (
    PROMPTS, assert_greedy_matches_generate, assert_streamed_export_equal, edited_checkpoint, export,
    assert_saved_round_trips, optimize_ort_cpu,
)

pytest.importorskip("transformers")

REL_TOL = 1e-5  # fp32 against transformers, as tests/moetrt/test_hf_parity.py


@pytest.fixture(scope="module")
def hf_model():
    return hf_tiny_model("dbrx")


@pytest.fixture(scope="module")
def exported(hf_model, tmp_path_factory):
    """(reference model, its canonical export), made once for the module's ort tests."""
    pytest.importorskip("onnxruntime")
    return export(hf_model, tmp_path_factory.mktemp("dbrx") / "onnx")


@pytest.mark.parametrize("p,normalize", [(1.0, 1), (2.0, 2), (None, 0)])
def test_routing_is_transformers_route_tokens_to_experts(p, normalize):
    """TopKRouting(softmax, normalize) computes DBRX's softmax, top-k and torch.norm(p) division (p=1: the
    1-norm of non-negative weights is their sum, the renormalisation every other family uses)."""
    hf = hf_tiny_model("dbrx", ffn_config=dict(moe_num_experts=6, moe_top_k=3, moe_normalize_expert_weights=p))
    ffn = hf.transformer.blocks[0].ffn
    logits = torch.randn(40, 6, generator=torch.Generator().manual_seed(2)) * 2
    ref_w, ref_i = ffn.route_tokens_to_experts(logits)
    weights, indices = moetrt.ops.topk_routing(logits, 3, "softmax", normalize, 1.0)
    assert torch.equal(indices.long(), ref_i)
    torch.testing.assert_close(weights, ref_w, rtol=1e-6, atol=1e-7)
    assert moetrt.from_pretrained(hf).layers[0].mlp.normalize == (normalize if normalize != 1 else True)


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_greedy_tokens_match_transformers_generate(hf_model, exported, backend):
    assert_greedy_matches_generate(hf_model, *exported, backend)


@pytest.mark.parametrize("change", [
    dict(attn_config=dict(kv_n_heads=2, clip_qkv=100.0, rope_theta=500000.0)),  # the clamp
    dict(ffn_config=dict(ffn_hidden_size=32, moe_num_experts=6, moe_top_k=2, moe_normalize_expert_weights=1.0)),
    dict(ffn_config=dict(ffn_hidden_size=32, moe_num_experts=6, moe_top_k=2, moe_normalize_expert_weights=None)),
    dict(attn_config=dict(kv_n_heads=2, clip_qkv=0.6, rope_theta=10000.0),
         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),  # the RoPE base
], ids=["clip_qkv", "p1", "no_norm", "rope_theta"])
def test_features_are_exercised(hf_model, change):
    """The tiny config only tests a feature if turning it off changes the logits (same seed, same weights otherwise)."""
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        base = moetrt.from_pretrained(hf_model)(ids).logits
        other_hf = hf_tiny_model("dbrx", **change)
        other = moetrt.from_pretrained(other_hf)(ids).logits
        ref, _ = hf_forward(other_hf, ids)
    assert rel_err(other, ref) <= REL_TOL  # each variation matches transformers too
    assert rel_err(other, base) > 1e-3


def test_checkpoint_folder_streams_into_the_same_export(hf_model, exported, tmp_path):
    """Streaming from the folder (Wqkv split, each expert's block of w1 / v1 / w2 read on its own) writes the
    same initializers as the in-memory export."""
    assert_streamed_export_equal(hf_model, exported[1], tmp_path)


def test_save_pretrained_writes_the_fused_layout_transformers_reads(hf_model, tmp_path):
    from safetensors import safe_open

    model = moetrt.from_pretrained(hf_model)
    moetrt.save_pretrained(model, tmp_path / "saved")
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    cfg = model.config
    assert shapes["transformer.blocks.0.norm_attn_norm.attn.Wqkv.weight"] == (64 + 2 * 2 * 16, 64)
    assert shapes["transformer.blocks.0.ffn.experts.mlp.w2"] == (cfg.num_experts * cfg.intermediate_size, 64)
    assert "transformer.norm_f.weight" in shapes and "transformer.wte.weight" in shapes
    assert assert_saved_round_trips(hf_model, model, tmp_path / "saved", REL_TOL) == "DbrxForCausalLM"


def test_optimize_ort_cpu_lowers_the_euclidean_norm_through_the_log_weights(exported, tmp_path):
    """com.microsoft::MoE renormalises by the sum only: the TopKRouting node (normalize=2) stays and routes, the
    fused op mixes its weights (log-weights path, times their sum); tokens stay those of the reference."""
    model, folder = exported
    lowering, ops = optimize_ort_cpu(model, folder, tmp_path / "opt")
    assert lowering["count"] == model.config.num_hidden_layers and not lowering.get("skipped"), lowering
    assert ops.count("com.microsoft::MoE") == ops.count("moetrt::TopKRouting") == model.config.num_hidden_layers
    assert "moetrt::SparseMoE" not in ops


def test_export_writes_a_genai_config_and_the_euclidean_body(exported):
    import onnx

    _, folder = exported
    meta = json.loads((folder / "moetrt.json").read_text())
    assert meta["genai"] == {"file": "genai_config.json"} and (folder / "genai_config.json").exists()
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    routers = [n for n in proto.graph.node if n.op_type == "TopKRouting"]
    assert {a.i for n in routers for a in n.attribute if a.name == "normalize"} == {2}
    (body,) = [f for f in proto.functions if f.name == "TopKRouting"]
    assert "ReduceSumSquare" in {n.op_type for n in body.node}


def test_rope_theta_of_attn_config_wins_with_a_warning(hf_model, tmp_path):
    """transformers 5.x rotates with the top-level base; DBRX's own attn_config.rope_theta is what the released
    models were trained with: moetrt follows it and says so where the two differ."""
    hf_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters")  # as the released config.json files: only attn_config.rope_theta
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="attn_config.rope_theta=500000"):
        model = moetrt.from_pretrained(tmp_path)
    assert model.config.rope_theta == 500000.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # where they agree, nothing is said
        moetrt.from_pretrained(hf_model)


@pytest.mark.parametrize("edit,needle", [
    (dict(ffn_config={"ffn_act_fn": {"name": "gelu"}}), "ffn_act_fn"),
    (dict(ffn_config={"moe_normalize_expert_weights": 3.0}), "moe_normalize_expert_weights=3.0"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
])
def test_what_moetrt_cannot_compute_is_refused(hf_model, tmp_path, edit, needle):
    with pytest.raises(UnsupportedModelError, match=needle):
        moetrt.from_pretrained(edited_checkpoint(hf_model, tmp_path, edit, nested=True))
