"""MiniMax-M2 (``model_type`` ``minimax_m2``): DeepSeek-V3's biased sigmoid router on Mixtral's layout.

The router scores ``sigmoid(Linear(D, E))``, chooses the k largest after adding
``e_score_correction_bias`` (no groups) and renormalises the unbiased scores of the k
(``TopKRouting(sigmoid, normalize=1, selection_bias)``); no shared experts, every layer MoE.
Attention: RMSNorm over the whole q and k projections (OLMoE's ``qk_norm="full"``) and partial
RoPE (``rotary_dim`` of ``head_dim`` in the released configs, ``partial_rotary_factor`` in v5).
On disk as Mixtral: ``block_sparse_moe.gate``, ``block_sparse_moe.e_score_correction_bias``,
``block_sparse_moe.experts.{e}.w1|w3|w2``.
"""

from __future__ import annotations

from typing import Any

from moetrt.config import MoEConfig

from ._base import field, rope
from .mixtral import Mixtral
from . import register


@register
class MiniMaxM2(Mixtral):
    model_type = "minimax_m2"
    architecture = "MiniMaxM2ForCausalLM"
    hf_config_class = "MiniMaxM2Config"
    default_rms_norm_eps = 1e-6
    family_qk_norm = "full"
    expresses = frozenset({"scoring", "selection_bias", "rotary_dim"})
    tiny_variants = {
        # a selection bias that changes the winners, full-width q/k norm, a quarter of each head rotating
        "minimax_m2": dict(
            num_local_experts=8, num_experts_per_tok=3, intermediate_size=32, head_dim=16,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        ),
    }

    def config_from_hf(self, hf: dict[str, Any]) -> MoEConfig:
        common = self.common_config(hf, field(hf, "num_local_experts", "num_experts"))
        return MoEConfig(
            **common, intermediate_size=field(hf, "intermediate_size"), scoring="sigmoid", normalize_topk=True,
            selection_bias=True, qk_norm="full", **rope(hf, 5e6, partial=True),
        )

    def inexpressible(self, cfg: MoEConfig) -> list[str]:
        problems = self.common_inexpressible(cfg)
        wanted = dict(scoring="sigmoid", normalize_topk=True, selection_bias=True, routed_scaling_factor=1.0,
                      clip_qkv=None, sliding_window=None)
        problems += [f"{k}={getattr(cfg, k)!r} (minimax_m2 has {v!r})" for k, v in wanted.items() if getattr(cfg, k) != v]
        problems += self.layout_inexpressible(cfg)
        if cfg.attention_bias or cfg.attention_out_bias:
            problems.append("attention biases (minimax_m2 has none)")
        return problems

    def hf_config(self, cfg: MoEConfig) -> dict[str, Any]:
        params = self.rope_parameters(cfg)
        params["partial_rotary_factor"] = (cfg.rotary_dim or cfg.head_dim) / cfg.head_dim
        return dict(num_local_experts=cfg.num_experts, intermediate_size=cfg.intermediate_size,
                    rope_parameters=params)

    def canonical_name(self, name: str) -> str:
        return super().canonical_name(name).replace(".mlp.e_score_correction_bias", ".mlp.selection_bias")

    def stored_name(self, name: str) -> str:
        return super().stored_name(name).replace(".mlp.selection_bias", ".block_sparse_moe.e_score_correction_bias")
