"""The DeepSeek line (deepseek_v3, glm4_moe, glm4_moe_lite, minimax_m2): config import, what each feature
changes, the latent cache's size, FP8 and multi-token-prediction tensors in checkpoints, bad input.

Logit parity with transformers for every tiny variant lives in test_hf_parity.py; the export,
runtime and generation stages in test_deepseek.py and the stage folders.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

import moetrt
from moetrt import MoEConfig, MoETransformer
from moetrt.errors import CheckpointError, UnsupportedModelError
from moetrt.state import LATENT, ROPE_KEY, state_contract
from tests.hf_tiny import hf_forward, hf_tiny_model, rel_err

pytest.importorskip("transformers")

VARIANTS = ["deepseek_v3", "deepseek_v3-plain", "glm4_moe", "glm4_moe_lite", "minimax_m2"]


def _ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 96, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _route(model: MoETransformer, ids: torch.Tensor):
    with torch.no_grad():
        out = model(ids, output_router=True)
    return out.router_indices


@pytest.mark.parametrize("variant", VARIANTS)
def test_selection_bias_changes_which_experts_win(variant):
    """The tiny checkpoints' bias is large enough to matter: zeroing it changes some tokens' experts."""
    ours = moetrt.from_pretrained(hf_tiny_model(variant))
    unbiased = MoETransformer(ours.config)
    unbiased.load_state_dict(ours.state_dict())
    with torch.no_grad():
        for layer in unbiased.layers:
            if layer.is_moe:
                layer.mlp.selection_bias.zero_()
    ids = _ids(2, 32)
    changed = [
        (torch.sort(a, dim=-1).values != torch.sort(b, dim=-1).values).any(-1).float().mean().item()
        for a, b in zip(_route(ours, ids), _route(unbiased.eval(), ids))
    ]
    assert max(changed) > 0.05, f"{variant}: the selection bias changed no routing decision ({changed})"


@pytest.mark.parametrize("variant", ["deepseek_v3", "glm4_moe"])
def test_groups_exclude_experts(variant):
    """Every token's experts lie in topk_group of the n_group groups, and the groups exclude some winners."""
    ours = moetrt.from_pretrained(hf_tiny_model(variant))
    cfg = ours.config
    assert cfg.n_group > cfg.topk_group
    size = cfg.num_experts // cfg.n_group
    for indices in _route(ours, _ids(3, 24)):
        groups = indices.long() // size  # [T, K]
        assert all(len(set(row.tolist())) <= cfg.topk_group for row in groups)
    ungrouped = MoETransformer(dataclasses.replace(cfg, n_group=1, topk_group=1))
    ungrouped.load_state_dict(ours.state_dict())
    a, b = _route(ours, _ids(3, 24)), _route(ungrouped.eval(), _ids(3, 24))
    assert any((torch.sort(x, -1).values != torch.sort(y, -1).values).any() for x, y in zip(a, b))


def test_degenerate_routing_equivalences():
    """n_group 1 (or topk_group == n_group) is plain top-k; a zero bias is no bias."""
    ours = moetrt.from_pretrained(hf_tiny_model("deepseek_v3"))
    cfg, ids = ours.config, _ids(2, 16, seed=4)
    all_groups = MoETransformer(dataclasses.replace(cfg, topk_group=cfg.n_group))
    no_groups = MoETransformer(dataclasses.replace(cfg, n_group=1, topk_group=1))
    for m in (all_groups, no_groups):
        m.load_state_dict(ours.state_dict())
        m.eval()
    with torch.no_grad():
        assert torch.equal(all_groups(ids).logits, no_groups(ids).logits)
    zero = MoETransformer(cfg)
    zero.load_state_dict(ours.state_dict())
    without = MoETransformer(dataclasses.replace(cfg, selection_bias=False))
    state = {k: v for k, v in ours.state_dict().items() if not k.endswith("selection_bias")}
    without.load_state_dict(state)
    with torch.no_grad():
        for layer in zero.layers:
            if layer.is_moe:
                layer.mlp.selection_bias.zero_()
        assert torch.equal(zero.eval()(ids).logits, without.eval()(ids).logits)


def test_config_import_reads_every_field():
    hf = hf_tiny_model("deepseek_v3")
    cfg = moetrt.from_pretrained(hf).config
    c = hf.config
    assert (cfg.model_type, cfg.scoring, cfg.selection_bias) == ("deepseek_v3", "sigmoid", True)
    assert (cfg.n_group, cfg.topk_group, cfg.group_scoring) == (c.n_group, c.topk_group, "top2_sum")
    assert cfg.routed_scaling_factor == c.routed_scaling_factor and cfg.normalize_topk
    assert cfg.shared_expert_intermediate_size == c.n_shared_experts * c.moe_intermediate_size
    assert not cfg.shared_expert_gate
    assert cfg.moe_layers == list(range(c.first_k_dense_replace, c.num_hidden_layers))
    assert cfg.dense_ffn_size == c.intermediate_size and cfg.intermediate_size == c.moe_intermediate_size
    assert (cfg.kv_lora_rank, cfg.q_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim) == (
        c.kv_lora_rank, c.q_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim)
    assert cfg.head_dim == c.qk_nope_head_dim + c.qk_rope_head_dim and cfg.rotary_dim == c.qk_rope_head_dim
    assert cfg.rope_scaling["rope_type"] == "yarn" and cfg.rope_scaling["mscale_all_dim"] == 0.707
    glm = moetrt.from_pretrained(hf_tiny_model("glm4_moe")).config
    assert (glm.rotary_dim, glm.head_dim, glm.qk_norm, glm.attention_bias, glm.attention_out_bias) == (8, 16, "head", True, False)
    lite = moetrt.from_pretrained(hf_tiny_model("glm4_moe_lite")).config
    assert lite.moe_layers == [1, 3] and lite.latent_attention
    mm = moetrt.from_pretrained(hf_tiny_model("minimax_m2")).config
    assert (mm.rotary_dim, mm.qk_norm, mm.n_group, mm.shared_expert_intermediate_size) == (4, "full", 1, 0)


def test_latent_cache_is_the_state_contract():
    """MLA layers carry latent [B, P, kv_lora_rank] and rope_key [B, P, qk_rope_head_dim], nothing else."""
    cfg = moetrt.from_pretrained(hf_tiny_model("deepseek_v3")).config
    contract = state_contract(cfg)
    assert all(layer == (LATENT, ROPE_KEY) for layer in contract.layers)
    assert contract.shape(0, "latent", 2, 7) == (2, 7, cfg.kv_lora_rank)
    assert contract.shape(0, "rope_key", 2, 7) == (2, 7, cfg.qk_rope_head_dim)
    assert contract.all_past_names()[:2] == ["past_key_values.0.latent", "past_key_values.0.rope_key"]
    assert type(contract).from_dict(json.loads(json.dumps(contract.to_dict()))) == contract


def test_latent_cache_bytes_for_deepseek_v3_sizes():
    """At DeepSeek-V3's real sizes the latent cache is 576 values per token and layer, full K/V 40960."""
    import transformers

    hf = transformers.DeepseekV3Config()  # the released model's sizes
    cfg = MoEConfig(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=hf.num_attention_heads, num_key_value_heads=hf.num_attention_heads,
        num_experts=hf.n_routed_experts, num_experts_per_tok=hf.num_experts_per_tok,
        intermediate_size=hf.moe_intermediate_size, kv_lora_rank=hf.kv_lora_rank, q_lora_rank=hf.q_lora_rank,
        qk_nope_head_dim=hf.qk_nope_head_dim, qk_rope_head_dim=hf.qk_rope_head_dim, v_head_dim=hf.v_head_dim,
    )
    contract = state_contract(cfg)
    latent = sum(e.shape(contract.size_map, 1, 1)[-1] for e in contract.entries(0))
    full_kv = cfg.num_attention_heads * (cfg.head_dim + cfg.v_head_dim)  # what expanded keys and values would hold
    assert (latent, full_kv) == (576, 40960)
    assert round(full_kv / latent, 1) == 71.1


def _saved(variant: str, folder):
    hf = hf_tiny_model(variant)
    hf.save_pretrained(folder)
    return hf


def test_multi_token_prediction_layers_are_skipped(tmp_path):
    """Released DeepSeek checkpoints hold num_nextn_predict_layers MTP layers; transformers ignores them, so do we."""
    from safetensors.torch import load_file, save_file

    hf = _saved("deepseek_v3", tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    layers = hf.config.num_hidden_layers
    mtp = {f"model.layers.{layers}.{k[len('model.layers.0.'):]}": v.clone()
           for k, v in tensors.items() if k.startswith("model.layers.0.")}
    mtp[f"model.layers.{layers}.eh_proj.weight"] = torch.zeros(4, 4)
    save_file({**tensors, **mtp}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = {k: v for k, v in json.loads((tmp_path / "config.json").read_text()).items()
              if k not in ("num_nextn_predict_layers", "num_mtp_layers")}
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 0}))
    with pytest.raises(CheckpointError, match="no place"):  # without MTP layers in the config they are unexplained
        moetrt.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    with pytest.warns(UserWarning, match="multi-token-prediction"):
        loaded = moetrt.from_pretrained(tmp_path)
    ref, _ = hf_forward(hf, _ids(1, 9))
    with torch.no_grad():
        assert rel_err(loaded(_ids(1, 9)).logits, ref) <= 1e-5


@pytest.mark.parametrize("variant", ["deepseek_v3", "glm4_moe_lite"])
def test_fp8_checkpoint_loads_to_transformers_weights(variant, tmp_path):
    """An FP8 e4m3 checkpoint with 128x128 (here partial) block scales dequantizes exactly, rope rows permuted after."""
    pytest.importorskip("accelerate", reason="transformers loads FP8 checkpoints only with accelerate")
    from tests.hf_tiny import save_fp8_checkpoint

    hf = hf_tiny_model(variant)
    reference = save_fp8_checkpoint(hf, tmp_path, block=(16, 16))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8"
    loaded = moetrt.from_pretrained(tmp_path)
    assert loaded.config.extra["source_quantization"]["fmt"] == "e4m3"
    ids = _ids(2, 13, seed=2)
    ref, _ = hf_forward(reference, ids)
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, ref) <= 1e-5


@pytest.mark.parametrize("change,error,match", [
    ({"num_key_value_heads": 2}, UnsupportedModelError, "num_key_value_heads"),
    ({"quantization_config": {"quant_method": "gptq"}}, UnsupportedModelError, "gptq"),
    ({"partial_rotary_factor": 0.5}, UnsupportedModelError, "partial_rotary_factor"),
    ({"n_group": 3}, CheckpointError, "n_group"),
    ({"topk_group": 9}, CheckpointError, "topk_group"),
    ({"kv_lora_rank": 0}, CheckpointError, "kv_lora_rank"),
], ids=["kv-heads", "gptq", "partial-rope", "n_group", "topk_group", "kv_lora_rank"])
def test_bad_deepseek_configs_are_refused(change, error, match, tmp_path):
    _saved("deepseek_v3", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(error, match=match):
        moetrt.from_pretrained(tmp_path)


def test_glm4_moe_lite_layer_kinds_must_match_the_layers(tmp_path):
    _saved("glm4_moe_lite", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "mlp_layer_types": ["dense", "sparse"]}))
    with pytest.raises(CheckpointError, match="mlp_layer_types"):
        moetrt.from_pretrained(tmp_path)


@pytest.mark.parametrize("fields,match", [
    (dict(q_lora_rank=8), "kv_lora_rank is None"),
    (dict(kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=5, v_head_dim=8, num_key_value_heads=4),
     "qk_rope_head_dim must be even"),
    (dict(kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8), "num_key_value_heads"),
    (dict(kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, num_key_value_heads=4,
          qk_norm="head"), "qk_norm"),
    (dict(rotary_dim=7), "rotary_dim"),
    (dict(group_scoring="mean"), "group_scoring"),
    (dict(num_experts=8, n_group=8, topk_group=2), "top2_sum"),
    (dict(num_experts=8, n_group=4, topk_group=1, num_experts_per_tok=3), "num_experts_per_tok"),
])
def test_config_validation_names_the_field(fields, match):
    base = dict(vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                num_experts=4, num_experts_per_tok=2, intermediate_size=16)
    with pytest.raises(ValueError, match=match):
        MoEConfig(**{**base, **fields})


def test_config_round_trips_through_its_dict():
    cfg = moetrt.from_pretrained(hf_tiny_model("deepseek_v3")).config
    again = MoEConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg and again.extra == cfg.extra
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MoETransformer(again)
