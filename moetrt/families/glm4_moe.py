"""GLM-4.5 / 4.6 / 4.7 (``model_type`` ``glm4_moe``) and GLM-4.7-Flash (``glm4_moe_lite``).

Both route as DeepSeek-V3 does (:mod:`moetrt.families.deepseek_v3`: sigmoid scores, the
``e_score_correction_bias`` choosing, groups, ungated shared experts, leading dense layers).
``glm4_moe`` has standard grouped-query attention with partial RoPE (``partial_rotary_factor``,
0.5 in the released configs: the first half of each head rotates), biases on q/k/v only
(``attention_bias``) and an optional per-head q/k RMSNorm (``use_qk_norm``); ``glm4_moe_lite``
has DeepSeek's multi-head latent attention and says which layers are dense with
``mlp_layer_types`` (``"dense"`` | ``"sparse"`` per layer); its config aliases ``head_dim`` to
``qk_rope_head_dim``, so RoPE covers exactly the rotary dims (a partial factor is refused).
"""

from __future__ import annotations

from typing import Any

from moetrt.config import MoEConfig
from moetrt.errors import CheckpointError, UnsupportedModelError

from ._base import rope
from .deepseek_v3 import DeepSeekLine
from . import register


@register
class Glm4Moe(DeepSeekLine):
    model_type = "glm4_moe"
    architecture = "Glm4MoeForCausalLM"
    hf_config_class = "Glm4MoeConfig"
    default_rms_norm_eps = 1e-5
    latent = False
    expresses = DeepSeekLine.expresses | {"rotary_dim"}
    tiny_variants = {
        # every feature on: groups and a selection bias, a shared expert, the first layer dense, partial RoPE
        # (half of each head), q/k/v biases, per-head q/k norm
        "glm4_moe": dict(
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, intermediate_size=48, head_dim=16,
            n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, norm_topk_prob=True,
            routed_scaling_factor=1.5, attention_bias=True, use_qk_norm=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        ),
    }

    def attention(self, hf: dict[str, Any], common: dict[str, Any]) -> dict[str, Any]:
        return dict(attention_bias=bool(hf.get("attention_bias", False)), attention_out_bias=False,
                    qk_norm="head" if hf.get("use_qk_norm") else None,
                    **rope(hf, self.default_theta, partial=True))

    def attention_inexpressible(self, cfg: MoEConfig) -> list[str]:
        problems = []
        if cfg.qk_norm not in (None, "head"):
            problems.append(f"qk_norm={cfg.qk_norm!r} (glm4_moe normalises per head or not at all)")
        if cfg.attention_out_bias:
            problems.append("a bias on o_proj (glm4_moe has biases on q/k/v only)")
        return problems

    def hf_config(self, cfg: MoEConfig) -> dict[str, Any]:
        params = self.rope_parameters(cfg)
        if cfg.rotary_dim is not None:
            params["partial_rotary_factor"] = cfg.rotary_dim / cfg.head_dim
        else:
            params["partial_rotary_factor"] = 1.0  # transformers' Glm4MoeConfig defaults it to 0.5
        return {**super().hf_config(cfg), "use_qk_norm": cfg.qk_norm == "head", "rope_parameters": params}

    def tiny_config(self, **overrides: Any):
        return super().tiny_config(**{"num_key_value_heads": 2, **overrides})


@register
class Glm4MoeLite(DeepSeekLine):
    model_type = "glm4_moe_lite"
    architecture = "Glm4MoeLiteForCausalLM"
    hf_config_class = "Glm4MoeLiteConfig"
    default_rms_norm_eps = 1e-5
    tiny_variants = {
        # latent attention with a q bottleneck, interleaved RoPE; layers 0 and 2 dense through mlp_layer_types
        "glm4_moe_lite": dict(
            n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, intermediate_size=40,
            n_shared_experts=1, mlp_layer_types=["dense", "sparse", "dense", "sparse"], num_hidden_layers=4,
            n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.8, kv_lora_rank=24,
            q_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=16, rope_interleave=True,
        ),
    }

    def dense_layers(self, hf: dict[str, Any], layers: int) -> tuple[int, ...]:
        kinds = hf.get("mlp_layer_types") or ["dense"] + ["sparse"] * (layers - 1)  # transformers' default
        if len(kinds) != layers:
            raise CheckpointError(
                f"config.json of this glm4_moe_lite checkpoint lists {len(kinds)} mlp_layer_types for {layers} "
                "layers (num_hidden_layers); the config is inconsistent: give one entry per layer"
            )
        unknown = sorted(set(kinds) - {"dense", "sparse"})
        if unknown:
            raise UnsupportedModelError(f"glm4_moe_lite mlp_layer_types {unknown} are not supported (dense, sparse)")
        return tuple(i for i, kind in enumerate(kinds) if kind == "dense")

    def dense_layers_expressible(self, dense: list[int], cfg: MoEConfig) -> bool:
        return True  # mlp_layer_types says it per layer

    def dense_hf_config(self, dense: list[int]) -> dict[str, Any]:
        return {}  # hf_config fills mlp_layer_types, which needs the layer count

    def hf_config(self, cfg: MoEConfig) -> dict[str, Any]:
        kinds = ["sparse" if cfg.is_moe_layer(i) else "dense" for i in range(cfg.num_hidden_layers)]
        # Glm4MoeLiteConfig aliases head_dim to qk_rope_head_dim, which the DeepSeek line writes as head_dim
        return {**super().hf_config(cfg), "mlp_layer_types": kinds}
