"""PhiMoE (``model_type`` ``phimoe``: microsoft/Phi-3.5-MoE-instruct).

What transformers' ``PhimoeForCausalLM`` computes in eval mode, and how moetrt holds it:

- router: ``Linear(D, E)`` without bias, then ``sparsemixer`` (eval mode): the best expert, then the
  best of the others, each weighted by its softmax over the logits within a relative
  ``2 * router_jitter_noise`` of it (``TopKRouting(scoring="sparsemixer", jitter_eps=...)``, always
  two experts, no renormalisation); ``input_jitter_noise`` acts in training only;
- SwiGLU experts (``hidden_act`` ``silu``), Mixtral's layout;
- ``nn.LayerNorm`` with bias (eps ``rms_norm_eps``) as the input, post-attention and final norms
  (``MoEConfig.layer_norm`` with ``layer_norm_bias``); biases on q/k/v and o_proj with ``attention_bias``; a bias on
  ``lm_head`` with ``lm_head_bias``; optional sliding window on every layer;
- RoPE: plain, or ``longrope`` as transformers' ``PhimoeRotaryEmbedding`` computes it (the short
  factor's frequencies at every length, cos/sin times ``long_mscale`` once a call's
  ``max(position_ids) + 1`` exceeds ``original_max_position_embeddings``, else ``short_mscale``;
  ``moetrt.rope``).

Refused, with the reason: ``num_experts_per_tok`` other than 2 (sparsemixer picks two whatever it
says), activations other than silu, longrope without the two mscales.

On disk: ``model.layers.{i}.block_sparse_moe.gate`` (router) and ``block_sparse_moe.experts.{e}.w1|w3|w2``;
transformers v5 in memory: ``mlp.router`` and ``mlp.experts.gate_up_proj`` ``[E, 2F, D]``. moetrt names
the router ``mlp.gate``.
"""

from __future__ import annotations

from typing import Any

from moetrt.config import MoEConfig
from moetrt.errors import UnsupportedModelError

from ._base import field, rope
from .mixtral import Mixtral
from . import register

# transformers' PhimoeConfig default: the jitter eps of sparsemixer's masks
_DEFAULT_JITTER = 0.01


@register
class Phimoe(Mixtral):
    model_type = "phimoe"
    architecture = "PhimoeForCausalLM"
    hf_config_class = "PhimoeConfig"
    expresses = frozenset({"scoring", "layer_norm", "layer_norm_bias", "lm_head_bias"})
    tiny_variants = {
        # every feature on: sparsemixer with a jitter eps that keeps some experts in each softmax and masks
        # others, attention and lm_head biases, a sliding window (48) shorter than the longest test prompts,
        # longrope switching mscale past 32 positions (prompts of 64 cross it)
        "phimoe": dict(),
    }

    def config_from_hf(self, hf: dict[str, Any]) -> MoEConfig:
        k = field(hf, "num_experts_per_tok")
        if k != 2:
            raise UnsupportedModelError(
                f"phimoe num_experts_per_tok={k} is not supported: transformers' sparsemixer routes every token to "
                "exactly 2 experts whatever the config says; set num_experts_per_tok to 2")
        common = self.common_config(hf, field(hf, "num_local_experts", "num_experts"))
        bias = bool(hf.get("attention_bias", False))
        return MoEConfig(
            **common, intermediate_size=field(hf, "intermediate_size"),
            scoring="sparsemixer", normalize_topk=False,
            sparsemixer_jitter_eps=float(hf.get("router_jitter_noise", _DEFAULT_JITTER)),
            layer_norm=True, layer_norm_bias=True, lm_head_bias=bool(hf.get("lm_head_bias", False)),
            attention_bias=bias, attention_out_bias=bias, sliding_window=hf.get("sliding_window"),
            **rope(hf, 1e6, longrope=True),
        )

    def inexpressible(self, cfg: MoEConfig) -> list[str]:
        problems = self.common_inexpressible(cfg)
        wanted = dict(scoring="sparsemixer", normalize_topk=False, routed_scaling_factor=1.0, layer_norm=True,
                      layer_norm_bias=True, attention_out_bias=cfg.attention_bias, clip_qkv=None)
        problems += [f"{k}={getattr(cfg, k)!r} (phimoe has {v!r})" for k, v in wanted.items() if getattr(cfg, k) != v]
        problems += self.layout_inexpressible(cfg)
        if cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] != "longrope":
            problems.append(f"RoPE {cfg.rope_scaling['rope_type']!r} (phimoe has plain RoPE or longrope)")
        return problems

    def hf_config(self, cfg: MoEConfig) -> dict[str, Any]:
        out = dict(num_local_experts=cfg.num_experts, intermediate_size=cfg.intermediate_size,
                   sliding_window=cfg.sliding_window, router_jitter_noise=cfg.sparsemixer_jitter_eps,
                   input_jitter_noise=0.0, attention_bias=cfg.attention_bias, lm_head_bias=cfg.lm_head_bias)
        if cfg.rope_scaling is not None:  # transformers' PhimoeConfig reads it at the top level too
            out["original_max_position_embeddings"] = cfg.rope_scaling["original_max_position_embeddings"]
        return out

    def canonical_name(self, name: str) -> str:
        # the on-disk router block_sparse_moe.gate and transformers v5's mlp.router are moetrt's mlp.gate
        return super().canonical_name(name).replace(".mlp.router.", ".mlp.gate.")

    # --- tests -----------------------------------------------------------------------------------
    def tiny_config(self, **overrides: Any):
        head_dim = 16  # hidden_size 64 / 4 heads
        kwargs = {
            "num_local_experts": 6, "intermediate_size": 48, "router_jitter_noise": 0.3, "attention_bias": True,
            "lm_head_bias": True, "sliding_window": 48,
            "rope_parameters": {
                "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 32,
                "short_factor": [1.0 + 0.15 * i for i in range(head_dim // 2)],
                "long_factor": [2.0 + 0.5 * i for i in range(head_dim // 2)],
                "short_mscale": 1.15, "long_mscale": 1.35,
            },
            **overrides,
        }
        return super().tiny_config(**kwargs)
