"""Qwen3-MoE (``model_type`` ``qwen3_moe``): per-head q/k RMSNorm, one bias flag for all four
attention projections, no shared expert; otherwise as Qwen2-MoE.
"""

from __future__ import annotations

from typing import Any

from moetrt.config import MoEConfig

from . import register
from .qwen2_moe import QwenMoE


@register
class Qwen3MoE(QwenMoE):
    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    hf_config_class = "Qwen3MoeConfig"
    family_qk_norm = "head"
    tiny_variants = {
        # per-head q/k norm, head_dim 24 != hidden/heads (16)
        "qwen3_moe": dict(
            num_experts=8, moe_intermediate_size=32, intermediate_size=64, head_dim=24, norm_topk_prob=True,
        ),
        "qwen3_moe-bias": dict(
            num_experts=5, moe_intermediate_size=32, intermediate_size=64, attention_bias=True, norm_topk_prob=False,
            mlp_only_layers=[2],
        ),
    }

    def attention_biases(self, hf: dict[str, Any]) -> dict[str, bool]:
        bias = bool(hf.get("attention_bias", False))
        return dict(attention_bias=bias, attention_out_bias=bias)

    def biases_expressible(self, cfg: MoEConfig) -> bool:
        return cfg.attention_bias == cfg.attention_out_bias  # one flag for all four projections

    def hf_config(self, cfg: MoEConfig) -> dict[str, Any]:
        return {**super().hf_config(cfg), "attention_bias": cfg.attention_bias}
