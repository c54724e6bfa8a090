"""Mixtral (``model_type`` ``mixtral``): softmax top-k routing renormalised over the k, SwiGLU experts.

On disk: ``model.layers.{i}.block_sparse_moe.gate`` (router) and one tensor per expert projection
``block_sparse_moe.experts.{e}.w1|w3|w2`` (gate, up, down); transformers v5 in memory:
``mlp.experts.gate_up_proj`` ``[E, 2F, D]``. Optional sliding-window attention on every layer.
"""

from __future__ import annotations

from typing import Any

from moetrt.config import MoEConfig

from ._base import Family, field, rope
from . import register


@register
class Mixtral(Family):
    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    hf_config_class = "MixtralConfig"
    expert_names = {"w1": "gate", "w3": "up", "w2": "down"}
    tiny_variants = {
        "mixtral": dict(num_local_experts=6, intermediate_size=48),
        "mixtral-tied": dict(num_local_experts=4, intermediate_size=40, tie_word_embeddings=True),
        "mixtral-window": dict(num_local_experts=4, intermediate_size=40, sliding_window=5),
    }

    def config_from_hf(self, hf: dict[str, Any]) -> MoEConfig:
        # transformers' attribute_map aliases the expert count: Mixtral configs serialise "num_local_experts"
        common = self.common_config(hf, field(hf, "num_local_experts", "num_experts"))
        return MoEConfig(
            **common, intermediate_size=field(hf, "intermediate_size"),
            normalize_topk=True, sliding_window=hf.get("sliding_window"),
            **rope(hf, 1e6),
        )

    def inexpressible(self, cfg: MoEConfig) -> list[str]:
        problems = self.common_inexpressible(cfg)
        if not cfg.normalize_topk:
            problems.append("normalize_topk=False (Mixtral always renormalises)")
        if cfg.clip_qkv is not None:
            problems.append("clip_qkv (OLMoE only)")
        problems += self.layout_inexpressible(cfg)
        if cfg.attention_bias or cfg.attention_out_bias:
            problems.append(
                f"attention_bias={cfg.attention_bias}, attention_out_bias={cfg.attention_out_bias} together"
            )
        return problems

    def hf_config(self, cfg: MoEConfig) -> dict[str, Any]:
        return dict(num_local_experts=cfg.num_experts, intermediate_size=cfg.intermediate_size,
                    sliding_window=cfg.sliding_window)

    def canonical_name(self, name: str) -> str:
        return super().canonical_name(name).replace(".block_sparse_moe.", ".mlp.")

    def stored_name(self, name: str) -> str:
        return name.replace(".mlp.gate.", ".block_sparse_moe.gate.").replace(
            ".mlp.experts", ".block_sparse_moe.experts")
