"""gpt-oss (``model_type`` ``gpt_oss``; openai/gpt-oss-20b and -120b).

What transformers' ``GptOssForCausalLM`` computes, and how moetrt holds it:

- router: ``Linear(D, E)`` with a bias; the k largest logits, softmax over those k (= softmax over
  all E then renormalised over the k: ``TopKRouting(softmax, normalize=1)``);
- experts: biases on gate/up and down, the clamped SwiGLU ``(clamp(up, -l, l) + 1) * g *
  sigmoid(alpha * g)`` with ``g = min(gate, l)`` (``SparseMoE(activation="clamped_swiglu")``);
- attention: q/k/v/o biases, a learned per-head sink logit in every softmax, ``layer_types``
  alternating sliding-window and full attention, YaRN RoPE.

Checkpoint layout (transformers' in-memory layout, which bf16 checkpoints store as is):
``mlp.router.weight|bias``; ``mlp.experts.gate_up_proj`` ``[E, D, 2F]`` with gate and up
*interleaved* along the last axis (gate at even columns), ``gate_up_proj_bias`` ``[E, 2F]`` the
same way, ``down_proj`` ``[E, F, D]``, ``down_proj_bias`` ``[E, D]``; ``self_attn.sinks`` ``[H]``.
The released checkpoints store the expert matrices as MXFP4 instead: ``*_blocks`` ``[E, R, G, 16]``
uint8 (e2m1 pairs) and ``*_scales`` ``[E, R, G]`` uint8 (e8m0), ``R`` the output rows (2F
interleaved, or D), ``G * 32`` the input dim; they are dequantized exactly (:mod:`moetrt.mxfp4`),
one expert at a time. moetrt stores gate rows then up rows (``[E, 2F, D]``), so every gate/up
tensor is de-interleaved on the way in and re-interleaved on the way out.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from moetrt.config import LAYER_TYPES, MoEConfig
from moetrt.errors import CheckpointError, UnsupportedModelError

from ._base import COMPANION, Family, Placement, field, rope
from . import register

if TYPE_CHECKING:
    from moetrt.model import MoETransformer

_EXPERT_TENSOR = re.compile(
    r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(_bias|_blocks|_scales)?$"
)


def _deinterleave_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., 2F, X] with gate/up rows interleaved -> gate rows then up rows."""
    return torch.cat((t[..., 0::2, :], t[..., 1::2, :]), dim=-2)


def _interleave_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., 2F, X] gate rows then up rows -> interleaved (gate at even rows)."""
    ffn = t.shape[-2] // 2
    return torch.stack((t[..., :ffn, :], t[..., ffn:, :]), dim=-2).flatten(-3, -2)


def _gate_up(t: torch.Tensor) -> torch.Tensor:  # one expert's [D, 2F] interleaved -> [2F, D]
    return _deinterleave_rows(t.transpose(0, 1)).contiguous()


def _down(t: torch.Tensor) -> torch.Tensor:  # one expert's [F, D] -> [D, F]
    return t.transpose(0, 1).contiguous()


def _gate_up_bias(b: torch.Tensor) -> torch.Tensor:  # [E, 2F] interleaved -> gate biases then up biases
    return _deinterleave_rows(b[..., None])[..., 0].contiguous()


def _gate_up_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:  # one expert: [2F, D]
    from moetrt.mxfp4 import dequantize_mxfp4

    return _deinterleave_rows(dequantize_mxfp4(blocks, scales, torch.bfloat16))


def _down_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:  # one expert: [D, F]
    from moetrt.mxfp4 import dequantize_mxfp4

    return dequantize_mxfp4(blocks, scales, torch.bfloat16)


@register
class GptOss(Family):
    model_type = "gpt_oss"
    architecture = "GptOssForCausalLM"
    hf_config_class = "GptOssConfig"
    expresses = frozenset({"activation", "expert_bias", "router_bias", "attention_sinks", "layer_types"})
    tiny_variants = {
        # every feature on: sliding window (3) shorter than the test prompts, alternating with full
        # attention; YaRN RoPE; a clamp limit small enough to clip gate and up of random weights
        "gpt_oss": dict(
            num_local_experts=6, intermediate_size=32, head_dim=16, num_experts_per_tok=2, sliding_window=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], swiglu_limit=0.3,
            rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 8.0, "beta_fast": 32.0,
                             "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 32},
        ),
        # the released checkpoints' defaults (limit 7, alpha 1.702), top-4 of 8, full attention first
        "gpt_oss-defaults": dict(
            num_local_experts=8, intermediate_size=24, num_experts_per_tok=4, sliding_window=5,
            layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
            num_hidden_layers=4,
        ),
    }

    # --- config ----------------------------------------------------------------------------------
    def config_from_hf(self, hf: dict[str, Any]) -> MoEConfig:
        quant = hf.get("quantization_config") or {}
        if quant and quant.get("quant_method") != "mxfp4":
            raise UnsupportedModelError(
                f"gpt_oss checkpoints quantized with {quant.get('quant_method')!r} are not supported (MXFP4 and "
                "unquantized ones are); use the original or a bf16 checkpoint"
            )
        common = self.common_config(hf, field(hf, "num_local_experts", "num_experts"))
        layers = common["num_hidden_layers"]
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)
        ]  # transformers' default
        if len(layer_types) != layers:
            raise CheckpointError(
                f"config.json of this gpt_oss checkpoint lists {len(layer_types)} layer_types for "
                f"{layers} layers (num_hidden_layers); the config is inconsistent: give one entry per layer"
            )
        unknown = sorted(set(layer_types) - set(LAYER_TYPES))
        if unknown:
            raise UnsupportedModelError(f"gpt_oss layer_types {unknown} are not supported; moetrt knows {LAYER_TYPES}")
        bias = bool(hf.get("attention_bias", True))
        return MoEConfig(
            **common, intermediate_size=field(hf, "intermediate_size"),
            normalize_topk=True, router_bias=True, expert_bias=True, activation="clamped_swiglu",
            swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)), swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
            attention_bias=bias, attention_out_bias=bias, attention_sinks=True,
            sliding_window=hf.get("sliding_window"), layer_types=tuple(layer_types),
            **rope(hf, 150000.0),
        )

    def inexpressible(self, cfg: MoEConfig) -> list[str]:
        problems = self.common_inexpressible(cfg)
        wanted = dict(normalize_topk=True, router_bias=True, expert_bias=True, activation="clamped_swiglu",
                      attention_sinks=True, clip_qkv=None)
        problems += [f"{k}={getattr(cfg, k)!r} (gpt_oss has {v!r})" for k, v in wanted.items() if getattr(cfg, k) != v]
        problems += self.layout_inexpressible(cfg)
        if cfg.attention_bias != cfg.attention_out_bias:
            problems.append(
                f"attention_bias={cfg.attention_bias}, attention_out_bias={cfg.attention_out_bias} together"
            )
        if cfg.layer_types is None and cfg.sliding_window is not None:
            problems.append("a sliding window on every layer (gpt_oss says which layers slide: set layer_types)")
        return problems

    def hf_config(self, cfg: MoEConfig) -> dict[str, Any]:
        layer_types = list(cfg.layer_types) if cfg.layer_types is not None else ["full_attention"] * cfg.num_hidden_layers
        return dict(num_local_experts=cfg.num_experts, intermediate_size=cfg.intermediate_size,
                    sliding_window=cfg.sliding_window, layer_types=layer_types, swiglu_alpha=cfg.swiglu_alpha,
                    swiglu_limit=cfg.swiglu_limit, attention_bias=cfg.attention_bias)

    # --- tensors ---------------------------------------------------------------------------------
    def canonical_name(self, name: str) -> str:
        return super().canonical_name(name).replace(".mlp.router.", ".mlp.gate.")

    def stored_name(self, name: str) -> str:
        return name.replace(".mlp.gate.", ".mlp.router.")

    def place(self, name: str, shape: tuple[int, ...], cfg: MoEConfig,
              params: dict[str, tuple[int, ...]]) -> list[Placement] | str | None:
        match = _EXPERT_TENSOR.match(self.canonical_name(name))
        if match is None:
            return super().place(name, shape, cfg, params)
        layer, proj, kind = int(match[1]), match[2], match[3] or ""
        key = f"layers.{layer}.mlp.experts.{proj}"
        if key not in params:
            return None
        E, D, F = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        gate_up = proj == "gate_up_proj"
        if kind == "_bias":
            if gate_up:
                return [Placement(f"{key}_bias", transform=_gate_up_bias, stored_shape=(E, 2 * F))]
            return [Placement(f"{key}_bias")]
        if kind == "_scales":
            return COMPANION
        if kind == "_blocks":
            rows, cols = (2 * F, D) if gate_up else (D, F)
            if cols % 32:
                raise CheckpointError(f"{name}: MXFP4 needs the input dim ({cols}) to be a multiple of 32")
            scales = name[: -len("_blocks")] + "_scales"
            transform = _gate_up_mxfp4 if gate_up else _down_mxfp4
            return [Placement(key, e, transform=transform, stored_shape=(E, rows, cols // 32, 16), select=e,
                              needs=(scales,)) for e in range(E)]
        stored = (E, D, 2 * F) if gate_up else (E, F, D)
        transform = _gate_up if gate_up else _down
        return [Placement(key, e, transform=transform, stored_shape=stored, select=e) for e in range(E)]

    def hf_tensors(self, model: "MoETransformer") -> Iterator[tuple[str, torch.Tensor]]:
        for prefix, name, tensor in self.saved_tensors(model):
            if name.endswith(".experts.gate_up_proj"):  # [E, 2F, D] -> [E, D, 2F] interleaved
                tensor = _interleave_rows(tensor).transpose(1, 2)
            elif name.endswith(".experts.down_proj"):  # [E, D, F] -> [E, F, D]
                tensor = tensor.transpose(1, 2)
            elif name.endswith(".experts.gate_up_proj_bias"):
                tensor = _interleave_rows(tensor[..., None])[..., 0]
            yield prefix + self.stored_name(name), tensor
