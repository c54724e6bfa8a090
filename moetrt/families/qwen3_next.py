"""Qwen3-Next (``model_type`` ``qwen3_next``): hybrid linear attention with a sparse MoE.

Layers are Gated DeltaNet (``linear_attention``) or full attention as ``layer_types`` says
(transformers derives it from ``full_attention_interval``: three linear layers per full one). Full
attention has a sigmoid output gate (``q_proj`` yields query and gate per head), q/k RMSNorm per head
and partial rotary (``partial_rotary_factor``); every RMSNorm but the DeltaNet's gated one scales by
``1 + w``. The MoE is Qwen2-MoE's: softmax top-k (renormalised with ``norm_topk_prob``) and a
sigmoid-gated shared expert, dense layers through ``mlp_only_layers`` / ``decoder_sparse_step``.

Checkpoints store the DeltaNet's q/k/v/z projection fused and grouped per key head
(``in_proj_qkvz``: per head ``q, k, v-group, z-group``) and b/a likewise (``in_proj_ba``); the
reference model holds them as Qwen3.5-MoE's separate ``in_proj_qkv`` / ``in_proj_z`` /
``in_proj_b`` / ``in_proj_a`` (rows regrouped, values unchanged), and saving regroups them back.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from moetrt.config import MoEConfig
from moetrt.errors import UnsupportedModelError

from . import register
from ._base import SKIPPED, Family, Placement, field, rope

if TYPE_CHECKING:
    from moetrt.model import MoETransformer

# keys of rope_parameters that only position multimodal inputs (Qwen3.5's M-RoPE sections): with text
# positions, equal on every section, M-RoPE is plain RoPE
_MROPE_KEYS = ("mrope_section", "mrope_interleaved")
LINEAR_TYPES = ("linear_attention", "full_attention")


def layer_types(hf: dict[str, Any]) -> tuple[str, ...]:
    """``layer_types`` of a config.json, or transformers' pattern from ``full_attention_interval`` (default 4)."""
    layers = field(hf, "num_hidden_layers")
    types = hf.get("layer_types")
    if types is None:
        interval = hf.get("full_attention_interval", 4)
        types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(layers)]
    bad = sorted(set(types) - set(LINEAR_TYPES))
    if bad:
        raise UnsupportedModelError(f"{hf.get('model_type')} layer_types {bad} are not supported (only {LINEAR_TYPES})")
    return tuple(types)


class HybridQwen(Family):
    """What Qwen3-Next and Qwen3.5-MoE share: the layer kinds, norms, gates and the MoE."""

    default_rms_norm_eps = 1e-6
    family_qk_norm = "head"
    all_layers_moe = False
    expresses = frozenset({"layer_types", "rotary_dim"})
    skipped_reason = "multi-token-prediction (mtp.*) layers, which transformers does not load either"

    def text_config(self, hf: dict[str, Any]) -> dict[str, Any]:
        """The language model's fields of config.json."""
        return hf

    def config_from_hf(self, hf: dict[str, Any]) -> MoEConfig:
        text = self.text_config(hf)
        if text.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {text['hidden_act']!r} is not supported (only 'silu')")
        params = {k: v for k, v in (text.get("rope_parameters") or {}).items() if k not in _MROPE_KEYS}
        text = {**text, "rope_parameters": params}
        common = self.common_config(text, field(text, "num_experts"))
        bias = bool(text.get("attention_bias", False))
        return MoEConfig(
            **common, intermediate_size=field(text, "moe_intermediate_size"),
            normalize_topk=self.normalize_topk(text),
            shared_expert_intermediate_size=field(text, "shared_expert_intermediate_size"), shared_expert_gate=True,
            decoder_sparse_step=text.get("decoder_sparse_step", 1),
            mlp_only_layers=tuple(text.get("mlp_only_layers") or ()),
            dense_intermediate_size=text.get("intermediate_size") if text.get("mlp_only_layers") else None,
            attention_bias=bias, attention_out_bias=bias, qk_norm="head", attention_output_gate=True,
            rms_norm_unit_offset=True, layer_types=layer_types(text),
            linear_num_key_heads=field(text, "linear_num_key_heads"),
            linear_num_value_heads=field(text, "linear_num_value_heads"),
            linear_key_head_dim=field(text, "linear_key_head_dim"),
            linear_value_head_dim=field(text, "linear_value_head_dim"),
            linear_conv_kernel_dim=text.get("linear_conv_kernel_dim", 4),
            **rope(text, 10000.0, partial=True),
        )

    def normalize_topk(self, text: dict[str, Any]) -> bool:
        return bool(text.get("norm_topk_prob", True))

    def inexpressible(self, cfg: MoEConfig) -> list[str]:
        problems = self.common_inexpressible(cfg)
        problems += self.layout_inexpressible(cfg)
        for name, want in (("attention_output_gate", True), ("rms_norm_unit_offset", True), ("clip_qkv", None),
                           ("sliding_window", None)):
            if getattr(cfg, name) != want:
                problems.append(f"{name}={getattr(cfg, name)!r} (the family has {want!r})")
        if cfg.attention_bias != cfg.attention_out_bias:
            problems.append("attention_bias and attention_out_bias differ (one attention_bias covers both)")
        if cfg.layer_types is None or set(cfg.layer_types) - set(LINEAR_TYPES):
            problems.append(f"layer_types={cfg.layer_types!r} (the family has {' / '.join(LINEAR_TYPES)} per layer)")
        if cfg.rope_scaling is not None:
            problems.append("RoPE scaling")
        return problems

    def shared_expert_problems(self, cfg: MoEConfig) -> list[str]:
        if not (cfg.shared_expert_intermediate_size and cfg.shared_expert_gate):
            return ["no gated shared expert (every MoE layer of the family has one)"]
        return []

    def hf_config(self, cfg: MoEConfig) -> dict[str, Any]:
        rope_parameters = self.rope_parameters(cfg)
        if cfg.rotary_dim is not None:
            rope_parameters["partial_rotary_factor"] = cfg.rotary_dim / cfg.head_dim
        return dict(
            num_experts=cfg.num_experts, moe_intermediate_size=cfg.intermediate_size,
            shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
            intermediate_size=cfg.dense_ffn_size, norm_topk_prob=cfg.normalize_topk,
            decoder_sparse_step=cfg.decoder_sparse_step, mlp_only_layers=list(cfg.mlp_only_layers),
            attention_bias=cfg.attention_bias, layer_types=list(cfg.layer_types),
            linear_num_key_heads=cfg.linear_num_key_heads, linear_num_value_heads=cfg.linear_num_value_heads,
            linear_key_head_dim=cfg.linear_key_head_dim, linear_value_head_dim=cfg.linear_value_head_dim,
            linear_conv_kernel_dim=cfg.linear_conv_kernel_dim, rope_parameters=rope_parameters,
        )

    def canonical_name(self, name: str) -> str:
        for prefix in ("model.language_model.", "model."):
            if name.startswith(prefix):
                return name[len(prefix):]
        return name

    def place(self, name: str, shape: tuple[int, ...], cfg: MoEConfig,
              params: dict[str, tuple[int, ...]]) -> list[Placement] | str | None:
        if name.startswith("mtp."):
            return SKIPPED
        return super().place(name, shape, cfg, params)

    def tiny_config(self, **overrides: Any):
        defaults = dict(
            num_hidden_layers=4, head_dim=16, num_experts=10, num_experts_per_tok=3, moe_intermediate_size=32,
            shared_expert_intermediate_size=48, linear_num_key_heads=2, linear_num_value_heads=4,
            linear_key_head_dim=8, linear_value_head_dim=12, linear_conv_kernel_dim=4,
        )
        return super().tiny_config(**{**defaults, **overrides})


def _qkvz_split(cfg: MoEConfig) -> tuple[int, int, int, int]:
    """Rows per key head of the fused projection: q, k, v group, z group."""
    group = cfg.linear_num_value_heads // cfg.linear_num_key_heads * cfg.linear_value_head_dim
    return cfg.linear_key_head_dim, cfg.linear_key_head_dim, group, group


@register
class Qwen3Next(HybridQwen):
    model_type = "qwen3_next"
    architecture = "Qwen3NextForCausalLM"
    hf_config_class = "Qwen3NextConfig"
    tiny_variants = {
        # three linear layers and a full one, 10 experts top-3 renormalised, a dense layer (2), partial rotary
        "qwen3_next": dict(
            layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
            mlp_only_layers=[2], intermediate_size=56, norm_topk_prob=True, attention_bias=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        ),
    }

    def place(self, name: str, shape: tuple[int, ...], cfg: MoEConfig,
              params: dict[str, tuple[int, ...]]) -> list[Placement] | str | None:
        canon = self.canonical_name(name)
        for fused, parts in ((".linear_attn.in_proj_qkvz.weight", ("qkv", "z")),
                             (".linear_attn.in_proj_ba.weight", ("b", "a"))):
            if canon.endswith(fused):
                base = canon[: -len(fused)] + ".linear_attn.in_proj_"
                if base + parts[0] + ".weight" not in params:
                    return None
                rows = sum(params[base + p + ".weight"][0] for p in parts)
                return [Placement(base + p + ".weight", transform=self._unfuse(cfg, parts, p),
                                  stored_shape=(rows, cfg.hidden_size)) for p in parts]
        return super().place(name, shape, cfg, params)

    @staticmethod
    def _unfuse(cfg: MoEConfig, parts: tuple[str, str], part: str):
        def transform(t: torch.Tensor) -> torch.Tensor:
            heads = t.view(cfg.linear_num_key_heads, -1, t.shape[-1])  # [Hk, rows per head, D]
            if parts == ("b", "a"):
                b, a = heads.chunk(2, dim=1)
                return (b if part == "b" else a).reshape(-1, t.shape[-1]).clone()
            q, k, v, z = heads.split(_qkvz_split(cfg), dim=1)
            if part == "z":
                return z.reshape(-1, t.shape[-1]).clone()
            return torch.cat([x.reshape(-1, t.shape[-1]) for x in (q, k, v)]).clone()
        return transform

    def hf_tensors(self, model: "MoETransformer") -> Iterator[tuple[str, torch.Tensor]]:
        cfg, hk = model.config, model.config.linear_num_key_heads
        key_dim = cfg.linear_num_key_heads * cfg.linear_key_head_dim
        for name, tensor in super().hf_tensors(model):
            if name.endswith(".linear_attn.in_proj_qkv.weight"):
                base = name[: -len("qkv.weight")]
                z = model.state_dict()[self.canonical_name(base) + "z.weight"]
                q, k, v = tensor.split((key_dim, key_dim, tensor.shape[0] - 2 * key_dim))
                per_head = [x.reshape(hk, -1, tensor.shape[-1]) for x in (q, k, v, z)]
                yield base + "qkvz.weight", torch.cat(per_head, dim=1).reshape(-1, tensor.shape[-1])
            elif name.endswith(".linear_attn.in_proj_b.weight"):
                base = name[: -len("b.weight")]
                a = model.state_dict()[self.canonical_name(base) + "a.weight"]
                per_head = [x.reshape(hk, -1, tensor.shape[-1]) for x in (tensor, a)]
                yield base + "ba.weight", torch.cat(per_head, dim=1).reshape(-1, tensor.shape[-1])
            elif not name.endswith((".linear_attn.in_proj_z.weight", ".linear_attn.in_proj_a.weight")):
                yield name, tensor
