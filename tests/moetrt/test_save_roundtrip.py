"""``moetrt.save_pretrained`` writes checkpoints transformers loads as-is, and moetrt reads back exactly."""

from __future__ import annotations

import pytest
import torch

import moetrt
from moetrt import MoEConfig, MoETransformer, UnsupportedModelError
from tests.hf_tiny import hf_forward, rel_err

pytest.importorskip("transformers")

# NOTE: the same fp32 math in transformers' order of operations
REL_TOL = 1e-5

BASE = dict(vocab_size=80, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            num_experts=5, num_experts_per_tok=2, intermediate_size=24, rope_theta=10000.0,
            max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
GPT_OSS = dict(normalize_topk=True, router_bias=True, expert_bias=True, activation="clamped_swiglu",
               attention_sinks=True, attention_bias=True, attention_out_bias=True, sliding_window=4,
               layer_types=("sliding_attention", "full_attention", "sliding_attention"))
DEEPSEEK = dict(scoring="sigmoid", selection_bias=True, normalize_topk=True, routed_scaling_factor=2.5,
                num_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2, shared_expert_intermediate_size=48, shared_expert_gate=False,
                mlp_only_layers=(0,), dense_intermediate_size=40, num_key_value_heads=4)
MLA = dict(kv_lora_rank=20, q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=10)
# every family with the options it can express
CONFIGS = {
    "deepseek_v3": dict(model_type="deepseek_v3", **DEEPSEEK, **MLA, attention_bias=True, attention_out_bias=True,
                        rope_scaling={"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.8,
                                      "original_max_position_embeddings": 32}),
    "deepseek_v3-noq": dict(model_type="deepseek_v3", **{**DEEPSEEK, "n_group": 1, "topk_group": 1,
                                                        "normalize_topk": False}, **{**MLA, "q_lora_rank": None}),
    "glm4_moe": dict(model_type="glm4_moe", **DEEPSEEK, attention_bias=True, qk_norm="head", head_dim=16,
                     rotary_dim=8),
    "glm4_moe_lite": dict(model_type="glm4_moe_lite", **{**DEEPSEEK, "mlp_only_layers": (0, 2)}, **MLA),
    "minimax_m2": dict(model_type="minimax_m2", scoring="sigmoid", selection_bias=True, normalize_topk=True,
                       qk_norm="full", head_dim=16, rotary_dim=4),
    "mixtral": dict(model_type="mixtral"),
    "mixtral-tied-window": dict(model_type="mixtral", tie_word_embeddings=True, sliding_window=6, head_dim=16),
    "qwen2_moe": dict(model_type="qwen2_moe", normalize_topk=False, shared_expert_intermediate_size=40,
                      attention_bias=True, decoder_sparse_step=1, mlp_only_layers=(1,), dense_intermediate_size=56),
    "qwen2_moe-step2": dict(model_type="qwen2_moe", normalize_topk=True, shared_expert_intermediate_size=16,
                            attention_bias=True, decoder_sparse_step=2, num_hidden_layers=4),
    "qwen3_moe": dict(model_type="qwen3_moe", qk_norm="head", head_dim=20, normalize_topk=True),
    "qwen3_moe-bias": dict(model_type="qwen3_moe", qk_norm="head", attention_bias=True, attention_out_bias=True,
                           normalize_topk=False, mlp_only_layers=(0,), dense_intermediate_size=30),
    "olmoe": dict(model_type="olmoe", qk_norm="full", clip_qkv=0.7, normalize_topk=False),
    "olmoe-bias": dict(model_type="olmoe", qk_norm="full", attention_bias=True, attention_out_bias=True,
                       normalize_topk=True, num_experts_per_tok=3),
    "gpt_oss": dict(model_type="gpt_oss", **GPT_OSS),
    "gpt_oss-yarn": dict(model_type="gpt_oss", **{**GPT_OSS, "swiglu_limit": 0.5, "swiglu_alpha": 1.5,
                                                  "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                                   "original_max_position_embeddings": 32}}),
    "granitemoe": dict(model_type="granitemoe", attention_bias=True, attention_out_bias=True, embedding_multiplier=2.5,
                       residual_multiplier=0.6, attention_scale=0.2, logits_scaling=1.7),
    "granitemoeshared": dict(model_type="granitemoeshared", embedding_multiplier=3.0, residual_multiplier=0.5,
                             attention_scale=0.3, logits_scaling=2.0, shared_expert_intermediate_size=20,
                             shared_expert_gate=False),
    "dbrx": dict(model_type="dbrx", layer_norm=True, rms_norm_eps=1e-5, clip_qkv=0.5, normalize_topk_p=2,
                 rope_theta=500000.0),
    "dbrx-sum": dict(model_type="dbrx", layer_norm=True, rms_norm_eps=1e-5, clip_qkv=8.0, num_key_value_heads=1),
}
# options a family's config.json cannot say: saving must refuse rather than write a wrong checkpoint
INEXPRESSIBLE = {
    "sigmoid scoring": ("mixtral", dict(scoring="sigmoid")),
    "routed scale": ("qwen3_moe", dict(qk_norm="head", routed_scaling_factor=2.0)),
    "mixtral without renormalisation": ("mixtral", dict(normalize_topk=False)),
    "mixtral with a shared expert": ("mixtral", dict(shared_expert_intermediate_size=16)),
    "mixtral with dense layers": ("mixtral", dict(mlp_only_layers=(0,))),
    "mixtral with q/k norm": ("mixtral", dict(qk_norm="head")),
    "qwen3 without q/k norm": ("qwen3_moe", dict()),
    "qwen3 with full q/k norm": ("qwen3_moe", dict(qk_norm="full")),
    "qwen3 with a shared expert": ("qwen3_moe", dict(qk_norm="head", shared_expert_intermediate_size=16)),
    "qwen3 with clip_qkv": ("qwen3_moe", dict(qk_norm="head", clip_qkv=1.0)),
    "qwen3 with a sliding window": ("qwen3_moe", dict(qk_norm="head", sliding_window=8)),
    "qwen3 bias on q/k/v only": ("qwen3_moe", dict(qk_norm="head", attention_bias=True)),
    "qwen2 without a shared expert": ("qwen2_moe", dict(attention_bias=True)),
    "qwen2 shared expert without gate": ("qwen2_moe", dict(attention_bias=True, shared_expert_intermediate_size=16,
                                                           shared_expert_gate=False)),
    "qwen2 with q/k norm": ("qwen2_moe", dict(qk_norm="head", attention_bias=True, shared_expert_intermediate_size=16)),
    "qwen2 with o_proj bias": ("qwen2_moe", dict(attention_bias=True, attention_out_bias=True,
                                                 shared_expert_intermediate_size=16)),
    "olmoe without q/k norm": ("olmoe", dict()),
    "olmoe with dense layers": ("olmoe", dict(qk_norm="full", mlp_only_layers=(1,))),
    "olmoe with head_dim != hidden/heads": ("olmoe", dict(qk_norm="full", head_dim=16)),
    "olmoe with a sliding window": ("olmoe", dict(qk_norm="full", sliding_window=8)),
    "mixtral with expert biases": ("mixtral", dict(expert_bias=True)),
    "olmoe with the clamped SwiGLU": ("olmoe", dict(qk_norm="full", activation="clamped_swiglu")),
    "qwen3 with attention sinks": ("qwen3_moe", dict(qk_norm="head", attention_sinks=True)),
    "mixtral with layer_types": ("mixtral", dict(sliding_window=4, layer_types=("sliding_attention",) * 3)),
    "gpt_oss without expert biases": ("gpt_oss", {**GPT_OSS, "expert_bias": False}),
    "gpt_oss with plain SwiGLU": ("gpt_oss", {**GPT_OSS, "activation": "silu"}),
    "gpt_oss without sinks": ("gpt_oss", {**GPT_OSS, "attention_sinks": False}),
    "gpt_oss with q/k norm": ("gpt_oss", {**GPT_OSS, "qk_norm": "head"}),
    "mixtral with a selection bias": ("mixtral", dict(selection_bias=True)),
    "qwen3 with groups": ("qwen3_moe", dict(qk_norm="head", num_experts=8, n_group=4, topk_group=2)),
    "mixtral with latent attention": ("mixtral", dict(**MLA, num_key_value_heads=4)),
    "mixtral with partial RoPE": ("mixtral", dict(rotary_dim=6)),
    "deepseek_v3 with softmax": ("deepseek_v3", {**DEEPSEEK, **MLA, "scoring": "softmax"}),
    "deepseek_v3 without latent attention": ("deepseek_v3", DEEPSEEK),
    "deepseek_v3 gated shared expert": ("deepseek_v3", {**DEEPSEEK, **MLA, "shared_expert_gate": True}),
    "deepseek_v3 dense layer last": ("deepseek_v3", {**DEEPSEEK, **MLA, "mlp_only_layers": (2,)}),
    "deepseek_v3 group max": ("deepseek_v3", {**DEEPSEEK, **MLA, "group_scoring": "max"}),
    "glm4_moe with latent attention": ("glm4_moe", {**DEEPSEEK, **MLA}),
    "glm4_moe with o_proj bias": ("glm4_moe", {**DEEPSEEK, "attention_bias": True, "attention_out_bias": True}),
    "minimax_m2 with groups": ("minimax_m2", dict(scoring="sigmoid", selection_bias=True, qk_norm="full",
                                                  num_experts=8, n_group=4, topk_group=2)),
    "mixtral with a residual multiplier": ("mixtral", dict(residual_multiplier=0.5)),
    "granitemoe with a shared expert": ("granitemoe", dict(attention_scale=0.2, shared_expert_intermediate_size=16,
                                                           shared_expert_gate=False)),
    "granitemoeshared with a gated shared expert": ("granitemoeshared", dict(attention_scale=0.2,
                                                                             shared_expert_intermediate_size=16)),
    "granitemoe without renormalisation": ("granitemoe", dict(attention_scale=0.2, normalize_topk=False)),
    "mixtral with the Euclidean norm": ("mixtral", dict(normalize_topk_p=2)),
    "mixtral with LayerNorm": ("mixtral", dict(layer_norm=True)),
    "dbrx with RMSNorm": ("dbrx", dict(rms_norm_eps=1e-5, clip_qkv=8.0)),
    "dbrx with q/k/v bias": ("dbrx", dict(layer_norm=True, rms_norm_eps=1e-5, attention_bias=True)),
    "unknown family": ("llama", dict()),
}


def _model(name: str) -> MoETransformer:
    model = MoETransformer.from_config(MoEConfig(**{**BASE, **CONFIGS[name]}), seed=1, std=0.12)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if pname.endswith("norm.weight"):
                param.uniform_(0.8, 1.2)
    return model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_transformers_loads_the_saved_checkpoint(name, tmp_path, record_max):
    import transformers

    model = _model(name)
    folder = moetrt.save_pretrained(model, tmp_path / "ckpt")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, output_loading_info=True, attn_implementation="eager", dtype=torch.float32
    )
    hf.eval()
    assert type(hf).__name__ == moetrt.families.get(model.config.model_type).architecture
    problems = {key: value for key, value in info.items() if value}
    assert not problems, f"transformers loading info: {problems}"
    ids = torch.randint(0, BASE["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(0))
    ref, _ = hf_forward(hf, ids)
    with torch.no_grad():
        err = rel_err(model(ids).logits, ref)
    record_max("save_pretrained -> transformers: max |ours - hf| / max |hf| (fp32)", model.config.model_type, err)
    assert err <= REL_TOL


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_moetrt_round_trip_is_exact(name, tmp_path):
    model = _model(name)
    folder = moetrt.save_pretrained(model, tmp_path / "ckpt", extra_files={"tokenizer.json": "{}"})
    assert (folder / "tokenizer.json").read_text() == "{}"
    assert not (tmp_path / "ckpt.partial").exists()
    loaded = moetrt.from_pretrained(folder)
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight
    ids = torch.randint(0, BASE["vocab_size"], (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


@pytest.mark.parametrize("name", sorted(INEXPRESSIBLE))
def test_inexpressible_options_refuse_to_save(name, tmp_path):
    family, changes = INEXPRESSIBLE[name]
    model = MoETransformer(MoEConfig(**{**BASE, "model_type": family, **changes}))
    with pytest.raises(UnsupportedModelError, match=family):
        moetrt.save_pretrained(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "ckpt.partial").exists()


def test_save_refuses_an_existing_folder(tmp_path):
    model = _model("mixtral")
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(moetrt.CheckpointError, match="already exists"):
        moetrt.save_pretrained(model, tmp_path / "ckpt")
