"""DeepSeek-V3 / R1 and Kimi-K2 (``model_type`` ``deepseek_v3``), and what the DeepSeek line shares.

What transformers' ``DeepseekV3ForCausalLM`` computes, and how moetrt holds it:

- router: ``sigmoid(Linear(D, E))`` scores; a learned ``e_score_correction_bias`` ``[E]`` added to
  them chooses the experts only (the weights are the unbiased scores); the experts form ``n_group``
  groups and a token picks among the ``topk_group`` groups with the largest sum of their top-2
  biased scores; the k weights renormalised (``norm_topk_prob``) and times
  ``routed_scaling_factor``: ``TopKRouting(sigmoid, selection_bias, n_group, topk_group)``;
- ``n_shared_experts`` shared experts, without a gate, summed with the routed ones (one dense MLP
  of ``n_shared_experts * moe_intermediate_size``); the first ``first_k_dense_replace`` layers dense;
- multi-head latent attention (:class:`moetrt.model.LatentAttention`): q through a rank
  ``q_lora_rank`` bottleneck, keys and values expanded from a cached latent of ``kv_lora_rank``
  beside one rotary key of ``qk_rope_head_dim``; YaRN RoPE whose ``mscale_all_dim`` also scales
  the softmax.

Checkpoint layout: ``self_attn.{q_a_proj,q_a_layernorm,q_b_proj,kv_a_proj_with_mqa,kv_a_layernorm,
kv_b_proj,o_proj}``, ``mlp.gate.weight`` and ``mlp.gate.e_score_correction_bias``,
``mlp.experts.{e}.{gate,up,down}_proj`` (or transformers v5's stacked ``gate_up_proj``),
``mlp.shared_experts.*``; released checkpoints also hold ``num_nextn_predict_layers``
multi-token-prediction layers after the last one, which transformers does not load either (skipped).
With ``rope_interleave`` (the released configs) the rotary dims of q and of the rotary key come in
interleaved pairs; moetrt permutes those rows of ``q_b_proj`` (``q_proj``) and
``kv_a_proj_with_mqa`` once on the way in (evens, then odds), after which the rotate-half RoPE
computes exactly what transformers' interleaved RoPE does, cached rotary key included; saved
folders say ``rope_interleave: false``. FP8 checkpoints (``weight_scale_inv`` per 128x128 block)
are dequantized on the way in (:mod:`moetrt.fp8`).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from moetrt.config import MoEConfig
from moetrt.errors import UnsupportedModelError

from ._base import SKIPPED, Family, Placement, field, rope
from . import register

_LAYER = re.compile(r"^layers\.(\d+)\.")


def _deinterleave(rows: torch.Tensor) -> torch.Tensor:
    """Rotary rows in interleaved pairs (x0, x1), (x2, x3), ... -> evens, then odds (rotate-half layout)."""
    return torch.cat((rows[0::2], rows[1::2]), dim=0)


def _interleave(rows: torch.Tensor) -> torch.Tensor:
    half = rows.shape[0] // 2
    return torch.stack((rows[:half], rows[half:]), dim=1).flatten(0, 1)


def _permute_rope_rows(t: torch.Tensor, heads: int, nope: int, rope_dim: int, fn) -> torch.Tensor:
    """Apply ``fn`` to the rotary rows of each head of a ``[heads * (nope + rope_dim), ...]`` projection."""
    per_head = t.reshape(heads, nope + rope_dim, *t.shape[1:])
    rot = torch.stack([fn(per_head[h, nope:]) for h in range(heads)])
    return torch.cat((per_head[:, :nope], rot), dim=1).reshape(t.shape).contiguous()


class DeepSeekLine(Family):
    """The DeepSeek-V3 design: biased, group-limited sigmoid routing, ungated shared experts, leading
    dense layers; latent attention where ``kv_lora_rank`` is set. deepseek_v3, glm4_moe(_lite) subclass it."""

    default_rms_norm_eps = 1e-6
    all_layers_moe = False
    expresses = frozenset({"scoring", "selection_bias", "n_group", "kv_lora_rank"})
    skipped_reason = (
        "multi-token-prediction layers after the last decoder layer (num_nextn_predict_layers); transformers "
        "does not load them either"
    )
    default_theta = 10000.0
    latent = True  # multi-head latent attention

    # --- config ----------------------------------------------------------------------------------
    def config_from_hf(self, hf: dict[str, Any]) -> MoEConfig:
        quant = hf.get("quantization_config") or {}
        if quant and quant.get("quant_method") != "fp8":
            raise UnsupportedModelError(
                f"{self.model_type} checkpoints quantized with {quant.get('quant_method')!r} are not supported "
                "(FP8 block-quantized and unquantized ones are); use the original or a bf16 checkpoint"
            )
        experts = field(hf, "n_routed_experts", "num_local_experts")
        common = self.common_config(hf, experts)
        layers = common["num_hidden_layers"]
        n_shared = int(hf.get("n_shared_experts") or 0)
        moe_ffn = field(hf, "moe_intermediate_size")
        ffn = hf.get("intermediate_size")
        n_group = int(hf.get("n_group") or 1)
        kwargs: dict[str, Any] = dict(
            intermediate_size=moe_ffn,
            dense_intermediate_size=None if ffn in (None, moe_ffn) else ffn,
            scoring="sigmoid", selection_bias=True, n_group=n_group,
            topk_group=int(hf.get("topk_group") or 1) if n_group > 1 else 1,
            normalize_topk=bool(hf.get("norm_topk_prob", True)),
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            shared_expert_intermediate_size=n_shared * moe_ffn, shared_expert_gate=False,
            mlp_only_layers=self.dense_layers(hf, layers),
        )
        kwargs.update(self.attention(hf, common))
        common.update(kwargs)
        return MoEConfig(**common, extra=self.read_extra(hf))

    def dense_layers(self, hf: dict[str, Any], layers: int) -> tuple[int, ...]:
        return tuple(range(min(int(hf.get("first_k_dense_replace") or 0), layers)))

    def attention(self, hf: dict[str, Any], common: dict[str, Any]) -> dict[str, Any]:
        """The attention fields: multi-head latent attention (glm4_moe overrides it with standard attention)."""
        heads = common["num_attention_heads"]
        if common["num_key_value_heads"] != heads:
            raise UnsupportedModelError(
                f"{self.model_type} with num_key_value_heads ({common['num_key_value_heads']}) != "
                f"num_attention_heads ({heads}) is not supported: latent attention expands keys and values per head"
            )
        bias = bool(hf.get("attention_bias", False))
        return dict(
            head_dim=None, kv_lora_rank=field(hf, "kv_lora_rank"), q_lora_rank=hf.get("q_lora_rank"),
            qk_nope_head_dim=field(hf, "qk_nope_head_dim"), qk_rope_head_dim=field(hf, "qk_rope_head_dim"),
            v_head_dim=field(hf, "v_head_dim"), attention_bias=bias, attention_out_bias=bias,
            **rope(hf, self.default_theta),  # RoPE over the qk_rope_head_dim rotary dims
        )

    # --- MoEConfig -> config.json ------------------------------------------------------------------
    def inexpressible(self, cfg: MoEConfig) -> list[str]:
        problems = self.common_inexpressible(cfg)
        if cfg.scoring != "sigmoid" or not cfg.selection_bias:
            problems.append(f"scoring={cfg.scoring!r} without a selection bias ({self.model_type} routes by "
                            "sigmoid scores with e_score_correction_bias)")
        if cfg.n_group > 1 and cfg.group_scoring != "top2_sum":
            problems.append(f"group_scoring={cfg.group_scoring!r} ({self.model_type} sums each group's top-2)")
        if cfg.latent_attention != self.latent:
            problems.append("latent attention" if cfg.latent_attention else "attention without a latent (kv_lora_rank)")
        if cfg.shared_expert_intermediate_size and (
            cfg.shared_expert_gate or cfg.shared_expert_intermediate_size % cfg.intermediate_size
        ):
            problems.append("a gated shared expert, or one whose size is no multiple of intermediate_size")
        dense = [i for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i)]
        if not self.dense_layers_expressible(dense, cfg):
            problems.append(f"dense layers {dense} ({self.model_type} has them only first)")
        if cfg.clip_qkv is not None or cfg.sliding_window is not None:
            problems.append("clip_qkv or a sliding window")
        problems += self.attention_inexpressible(cfg)
        return problems

    def dense_layers_expressible(self, dense: list[int], cfg: MoEConfig) -> bool:
        return dense == list(range(len(dense)))

    def attention_inexpressible(self, cfg: MoEConfig) -> list[str]:
        problems = []
        if cfg.qk_norm is not None:
            problems.append(f"qk_norm={cfg.qk_norm!r}")
        if cfg.attention_bias != cfg.attention_out_bias:
            problems.append(f"attention_bias={cfg.attention_bias}, attention_out_bias={cfg.attention_out_bias} together")
        return problems

    def shared_expert_problems(self, cfg: MoEConfig) -> list[str]:
        return []

    def hf_config(self, cfg: MoEConfig) -> dict[str, Any]:
        dense = [i for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i)]
        out = dict(
            n_routed_experts=cfg.num_experts, moe_intermediate_size=cfg.intermediate_size,
            intermediate_size=cfg.dense_ffn_size, n_shared_experts=cfg.shared_expert_intermediate_size // cfg.intermediate_size,
            n_group=cfg.n_group, topk_group=cfg.topk_group, norm_topk_prob=cfg.normalize_topk,
            routed_scaling_factor=cfg.routed_scaling_factor, attention_bias=cfg.attention_bias,
            **self.dense_hf_config(dense),
        )
        if cfg.latent_attention:
            out.update(kv_lora_rank=cfg.kv_lora_rank, q_lora_rank=cfg.q_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                       qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, head_dim=cfg.qk_rope_head_dim,
                       rope_interleave=False)  # the rotary rows are stored de-interleaved (see the module docstring)
        return out

    def dense_hf_config(self, dense: list[int]) -> dict[str, Any]:
        return dict(first_k_dense_replace=len(dense))

    # --- tensors ---------------------------------------------------------------------------------
    def canonical_name(self, name: str) -> str:
        return (super().canonical_name(name).replace(".mlp.shared_experts.", ".mlp.shared_expert.")
                .replace(".mlp.gate.e_score_correction_bias", ".mlp.selection_bias"))

    def stored_name(self, name: str) -> str:
        return (name.replace(".mlp.shared_expert.", ".mlp.shared_experts.")
                .replace(".mlp.selection_bias", ".mlp.gate.e_score_correction_bias"))

    def place(self, name: str, shape: tuple[int, ...], cfg: MoEConfig,
              params: dict[str, tuple[int, ...]]) -> list[Placement] | str | None:
        canon = self.canonical_name(name)
        layer = _LAYER.match(canon)
        if layer and int(layer[1]) >= cfg.num_hidden_layers and int(layer[1]) < cfg.num_hidden_layers + int(
            cfg.extra.get("num_nextn_predict_layers", 0)
        ):
            return SKIPPED
        where = super().place(name, shape, cfg, params)
        if not cfg.latent_attention or not cfg.extra.get("rope_interleave") or not isinstance(where, list):
            return where
        proj = canon.rsplit(".", 2)[-2] if canon.count(".") >= 2 else ""
        if proj in ("q_proj", "q_b_proj"):
            heads, nope = cfg.num_attention_heads, cfg.qk_nope_head_dim
        elif proj == "kv_a_proj_with_mqa":
            heads, nope = 1, cfg.kv_lora_rank
        else:
            return where
        permute = lambda t: _permute_rope_rows(t, heads, nope, cfg.qk_rope_head_dim, _deinterleave)  # noqa: E731
        return [_then(p, permute, params[p.key]) for p in where]

    def read_extra(self, hf: dict[str, Any]) -> dict[str, Any]:
        """What the tensor mapping needs from config.json beyond MoEConfig (kept in ``MoEConfig.extra``)."""
        return dict(num_nextn_predict_layers=int(hf.get("num_nextn_predict_layers") or hf.get("num_mtp_layers") or 0),
                    rope_interleave=bool(hf.get("rope_interleave", True)) and self.latent)

    # --- tests -----------------------------------------------------------------------------------
    def tiny_config(self, **overrides: Any):
        return super().tiny_config(**{"num_key_value_heads": 4, **overrides})


def _then(p: Placement, fn, shape: tuple[int, ...]) -> Placement:
    """``p`` with ``fn`` (which keeps the shape) applied after its transform, or to the stored tensor of ``shape``."""
    from dataclasses import replace

    inner = p.transform
    if inner is None:
        return replace(p, transform=fn, stored_shape=tuple(shape))
    return replace(p, transform=lambda t, *c: fn(inner(t, *c)))


# a YaRN RoPE with DeepSeek's mscale / mscale_all_dim (both scale the attention), past its original window
_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.707, "mscale_all_dim": 0.707,
         "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0}


@register
class DeepseekV3(DeepSeekLine):
    model_type = "deepseek_v3"
    architecture = "DeepseekV3ForCausalLM"
    hf_config_class = "DeepseekV3Config"
    tiny_variants = {
        # every feature on: 4 groups of 2 experts, 2 groups kept, a selection bias, 2 shared experts, the
        # first layer dense, q and kv low-rank, interleaved YaRN RoPE with mscale_all_dim, biases
        "deepseek_v3": dict(
            n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=24, intermediate_size=56,
            n_shared_experts=2, first_k_dense_replace=1, n_group=4, topk_group=2, norm_topk_prob=True,
            routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=12, rope_interleave=True, attention_bias=True, rope_parameters=_YARN,
        ),
        # the other branches: q without a bottleneck, no groups, weights not renormalised, plain RoPE not
        # interleaved, no dense layer, one shared expert
        "deepseek_v3-plain": dict(
            n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=20, intermediate_size=20,
            n_shared_experts=1, first_k_dense_replace=0, n_group=1, topk_group=1, norm_topk_prob=False,
            routed_scaling_factor=1.0, kv_lora_rank=24, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8,
            v_head_dim=16, rope_interleave=False,
        ),
    }
