"""Qwen2-MoE / Qwen1.5-MoE (``model_type`` ``qwen2_moe``): a sigmoid-gated shared expert beside the
routed ones, biases on q/k/v (never on o_proj), dense layers through ``mlp_only_layers`` and
``decoder_sparse_step``, softmax routing optionally renormalised (``norm_topk_prob``).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from moetrt.config import MoEConfig
from moetrt.errors import UnsupportedModelError

from ._base import Family, field, rope
from . import register


class QwenMoE(Family):
    """What Qwen2-MoE and Qwen3-MoE share: expert sizes, dense layers, routing options."""

    default_rms_norm_eps = 1e-6
    all_layers_moe = False  # decoder_sparse_step and mlp_only_layers say which layers are dense

    def config_from_hf(self, hf: dict[str, Any]) -> MoEConfig:
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError(
                f"{self.model_type} with use_sliding_window=true (per-layer windows) is not supported"
            )
        # Hub checkpoints of Qwen2/3-MoE say "num_experts"
        common = self.common_config(hf, field(hf, "num_experts", "num_local_experts"))
        return MoEConfig(
            **common, intermediate_size=field(hf, "moe_intermediate_size"),
            normalize_topk=bool(hf.get("norm_topk_prob", False)),
            shared_expert_intermediate_size=self.shared_expert_size(hf),
            decoder_sparse_step=hf.get("decoder_sparse_step", 1),
            mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
            # intermediate_size is the dense layers' F; equal to the experts' F it says nothing new
            dense_intermediate_size=(
                None if hf.get("intermediate_size") == hf["moe_intermediate_size"] else hf.get("intermediate_size")
            ),
            **self.attention_biases(hf),
            qk_norm=self.family_qk_norm, **rope(hf, 1e6),
        )

    def shared_expert_size(self, hf: dict[str, Any]) -> int:
        return 0

    @abstractmethod
    def attention_biases(self, hf: dict[str, Any]) -> dict[str, bool]:
        ...

    def inexpressible(self, cfg: MoEConfig) -> list[str]:
        problems = self.common_inexpressible(cfg)
        if cfg.clip_qkv is not None:
            problems.append("clip_qkv (OLMoE only)")
        if cfg.sliding_window is not None:
            problems.append("a sliding window (Mixtral only)")
        problems += self.layout_inexpressible(cfg)
        if not self.biases_expressible(cfg):
            problems.append(
                f"attention_bias={cfg.attention_bias}, attention_out_bias={cfg.attention_out_bias} together"
            )
        return problems

    @abstractmethod
    def biases_expressible(self, cfg: MoEConfig) -> bool:
        ...

    def hf_config(self, cfg: MoEConfig) -> dict[str, Any]:
        return dict(num_experts=cfg.num_experts, moe_intermediate_size=cfg.intermediate_size,
                    intermediate_size=cfg.dense_ffn_size, norm_topk_prob=cfg.normalize_topk,
                    decoder_sparse_step=cfg.decoder_sparse_step, mlp_only_layers=list(cfg.mlp_only_layers),
                    use_sliding_window=False)


@register
class Qwen2MoE(QwenMoE):
    model_type = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    hf_config_class = "Qwen2MoeConfig"
    tiny_variants = {
        # shared expert on every MoE layer, MoE only on odd layers (1), softmax weights not renormalised
        "qwen2_moe-shared": dict(
            num_experts=6, moe_intermediate_size=32, shared_expert_intermediate_size=80, intermediate_size=56,
            decoder_sparse_step=2, norm_topk_prob=False, num_hidden_layers=4,
        ),
        # layer 0 dense through mlp_only_layers, renormalised top-k, top-3 of 8
        "qwen2_moe-dense0": dict(
            num_experts=8, num_experts_per_tok=3, moe_intermediate_size=24, shared_expert_intermediate_size=40,
            intermediate_size=72, mlp_only_layers=[0], norm_topk_prob=True,
        ),
    }

    def shared_expert_size(self, hf: dict[str, Any]) -> int:
        return hf.get("shared_expert_intermediate_size", 0)

    def attention_biases(self, hf: dict[str, Any]) -> dict[str, bool]:
        return dict(attention_bias=bool(hf.get("qkv_bias", True)), attention_out_bias=False)

    def shared_expert_problems(self, cfg: MoEConfig) -> list[str]:
        if not (cfg.shared_expert_intermediate_size and cfg.shared_expert_gate):
            return ["no gated shared expert (every Qwen2-MoE MoE layer has one)"]
        return []

    def biases_expressible(self, cfg: MoEConfig) -> bool:
        return not cfg.attention_out_bias  # bias on q/k/v (qkv_bias), never on o_proj

    def hf_config(self, cfg: MoEConfig) -> dict[str, Any]:
        return {**super().hf_config(cfg), "shared_expert_intermediate_size": cfg.shared_expert_intermediate_size,
                "qkv_bias": cfg.attention_bias}
