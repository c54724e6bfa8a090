"""OLMoE (``model_type`` ``olmoe``): RMSNorm over the whole q and k projections before the head
split, optional ``clip_qkv``, softmax routing optionally renormalised, every layer MoE.
"""

from __future__ import annotations

from typing import Any

from moetrt.config import MoEConfig

from ._base import Family, field, rope
from . import register


@register
class OLMoE(Family):
    model_type = "olmoe"
    architecture = "OlmoeForCausalLM"
    hf_config_class = "OlmoeConfig"
    family_qk_norm = "full"
    tiny_variants = {
        # full-width q/k norm and clipped q/k/v
        "olmoe": dict(num_experts=6, intermediate_size=32, clip_qkv=0.6, norm_topk_prob=False),
        "olmoe-norm": dict(num_experts=4, intermediate_size=32, norm_topk_prob=True, attention_bias=True),
    }

    def config_from_hf(self, hf: dict[str, Any]) -> MoEConfig:
        common = self.common_config(hf, field(hf, "num_experts", "num_local_experts"))
        bias = bool(hf.get("attention_bias", False))
        return MoEConfig(
            **common, intermediate_size=field(hf, "intermediate_size"),
            normalize_topk=bool(hf.get("norm_topk_prob", False)), qk_norm="full", clip_qkv=hf.get("clip_qkv"),
            attention_bias=bias, attention_out_bias=bias, **rope(hf, 10000.0),
        )

    def inexpressible(self, cfg: MoEConfig) -> list[str]:
        problems = self.common_inexpressible(cfg)
        if cfg.sliding_window is not None:
            problems.append("a sliding window (Mixtral only)")
        problems += self.layout_inexpressible(cfg)
        if cfg.attention_bias != cfg.attention_out_bias:
            problems.append(
                f"attention_bias={cfg.attention_bias}, attention_out_bias={cfg.attention_out_bias} together"
            )
        if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
            problems.append("head_dim != hidden_size / num_attention_heads (OLMoE's k_norm assumes it)")
        return problems

    def hf_config(self, cfg: MoEConfig) -> dict[str, Any]:
        return dict(num_experts=cfg.num_experts, intermediate_size=cfg.intermediate_size,
                    norm_topk_prob=cfg.normalize_topk, clip_qkv=cfg.clip_qkv, attention_bias=cfg.attention_bias)
