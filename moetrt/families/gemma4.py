"""Gemma 4 MoE (``model_type`` ``gemma4_text``: google/gemma-4-26B-A4B's text model; ``gemma4``: the
image-text checkpoint, whose text model moetrt imports).

What transformers' ``Gemma4ForCausalLM`` computes with ``enable_moe_block``, and how moetrt holds it:

- every layer runs a dense GeGLU MLP (``intermediate_size``) *beside* the routed experts
  (``moe_intermediate_size``): the dense output normed by ``post_feedforward_layernorm_1``; the
  experts read the residual stream through ``pre_feedforward_layernorm_2`` and are normed by
  ``post_feedforward_layernorm_2``; the sum is normed by ``post_feedforward_layernorm`` before
  the residual add (``MoEConfig.moe_beside_dense``, ``sandwich_norms``);
- router: a weightless RMSNorm of the residual stream times a learned ``scale`` [D] times
  ``D^-1/2``, ``Linear(D, E)``, softmax over all experts, the k best renormalised
  (``TopKRouting(softmax, normalize=1)``), then each weight times its expert's
  ``per_expert_scale``. That last product is linear in the expert's output, so moetrt folds
  ``per_expert_scale[e]`` into expert ``e``'s down projection on import (exact up to float
  rounding) and saves ``per_expert_scale`` as ones with the scaled down projections;
- the experts' activation is ``hidden_activation`` = ``gelu_pytorch_tanh``: GeGLU,
  ``gelu_tanh(gate) * up`` (``SparseMoE(activation="gelu_tanh")``); the dense MLP uses it too;
- attention: per-head q/k RMSNorm, a weightless RMSNorm on the values, softmax scale 1;
  ``layer_types`` sliding-window and full layers; full layers have their own head dim and
  key/value heads (``per_layer_config``, or ``global_head_dim`` / ``num_global_key_value_heads``),
  use the key projection as the values too (``attention_k_eq_v``) and their own RoPE
  (``proportional``: a share of the frequencies over the whole head, the rest zero);
- the embeddings times ``sqrt(hidden_size)``, a learned ``layer_scalar`` per layer, logits
  soft-capped at ``final_logit_softcapping``, tied embeddings.

Refused, with the reason: per-layer input embeddings (``hidden_size_per_layer_input``, the E2B/E4B
models), shared key/value layers (``num_kv_shared_layers``), bidirectional attention, configs
without the MoE block (dense Gemma 4), other activations.

Checkpoint layout (transformers' in-memory names): ``layers.{i}.mlp.{gate,up,down}_proj`` (dense),
``layers.{i}.router.{proj.weight,scale,per_expert_scale}``, ``layers.{i}.experts.gate_up_proj``
``[E, 2F, D]`` (gate rows then up rows) and ``down_proj`` ``[E, D, F]``, ``layers.{i}.layer_scalar``;
the image-text checkpoint holds them under ``model.language_model.`` beside the vision and audio
towers (skipped). moetrt names the experts' block ``layers.{i}.mlp`` (router ``mlp.gate``, its
scale ``mlp.router_scale``) and the dense MLP ``layers.{i}.dense_mlp``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from moetrt.config import LAYER_TYPES, MoEConfig
from moetrt.errors import CheckpointError, UnsupportedModelError

from ._base import COMPANION, SKIPPED, Family, ImageTextFamily, Placement, field
from . import register

if TYPE_CHECKING:
    from moetrt.model import MoETransformer

# the on-disk names -> moetrt's (order matters: the dense MLP leaves "mlp." before the experts take it)
_RENAMES = ((".mlp.", ".dense_mlp."), (".router.proj.", ".mlp.gate."), (".router.scale", ".mlp.router_scale"),
            (".experts.", ".mlp.experts."))


def _fold_expert_scale(down: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``down_proj`` [E, D, F] with each expert's rows times its ``per_expert_scale`` [E] (float32)."""
    return down.float() * scale.float()[:, None, None]


def _rope_of(params: dict[str, Any] | None, layer_type: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) of one layer type's ``rope_parameters``."""
    params = dict(params or {})
    theta = float(params.get("rope_theta", 10000.0 if layer_type == "sliding_attention" else 1e6))
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedModelError(
                f"gemma4 {layer_type} RoPE with partial_rotary_factor={params['partial_rotary_factor']!r} and rope_type "
                "'default' is not supported (Gemma 4 uses 'proportional' for a partial rotary)")
        return theta, None
    if rope_type != "proportional" or layer_type != "full_attention":
        raise UnsupportedModelError(
            f"gemma4 {layer_type} RoPE type {rope_type!r} is not supported (sliding layers: 'default'; full layers: "
            "'default' or 'proportional')")
    unknown = sorted(set(params) - {"rope_type", "rope_theta", "partial_rotary_factor", "factor"})
    if unknown:
        raise UnsupportedModelError(f"gemma4 proportional RoPE parameters {unknown} are not supported")
    return theta, {"rope_type": "proportional", "partial_rotary_factor": float(params.get("partial_rotary_factor", 1.0)),
                   "factor": float(params.get("factor", 1.0))}


@register
class Gemma4Text(Family):
    model_type = "gemma4_text"
    architecture = "Gemma4ForCausalLM"
    hf_config_class = "Gemma4TextConfig"
    default_rms_norm_eps = 1e-6
    family_qk_norm = "head"
    expresses = frozenset({"activation", "layer_types"})
    skipped_reason = "the vision and audio towers of an image-text checkpoint (moetrt imports its text model)"
    # where the text model's tensors live in the checkpoint ("model.": Gemma4ForCausalLM)
    text_prefix = "model."
    tiny_variants = {
        # every feature on: sliding window 3 shorter than the prompts; full layers with a wider head (32 vs 16),
        # one key/value head, keys as values and proportional RoPE (a quarter of the frequencies); soft-capped
        # logits; the dense MLP beside 6 experts, top-2
        "gemma4_text": dict(
            num_hidden_layers=4, sliding_window=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            final_logit_softcapping=3.0,
        ),
        # no k_eq_v, full layers with the sliding ones' head dim and heads, plain RoPE on full layers, no soft cap,
        # untied embeddings, top-3
        "gemma4_text-plain": dict(
            num_hidden_layers=3, attention_k_eq_v=False, global_head_dim=16, top_k_experts=3, sliding_window=5,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"], tie_word_embeddings=False,
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "default", "rope_theta": 500000.0}},
        ),
    }

    # --- config ----------------------------------------------------------------------------------
    def config_from_hf(self, hf: dict[str, Any]) -> MoEConfig:
        self.refuse_quantized(hf)
        top, hf = hf, self.text_config(hf)
        if not hf.get("enable_moe_block"):
            raise UnsupportedModelError(
                "this gemma4 checkpoint has no MoE block (enable_moe_block is false): it is a dense model; moetrt is for "
                "the Mixture-of-Experts ones (gemma-4-26B-A4B)")
        act = hf.get("hidden_activation", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise UnsupportedModelError(f"gemma4 hidden_activation {act!r} is not supported (only 'gelu_pytorch_tanh')")
        if hf.get("hidden_size_per_layer_input"):
            raise UnsupportedModelError(
                "gemma4 per-layer input embeddings (hidden_size_per_layer_input > 0, the E2B/E4B models) are not supported")
        if hf.get("num_kv_shared_layers"):
            raise UnsupportedModelError("gemma4 layers sharing another layer's keys and values (num_kv_shared_layers > 0) "
                                        "are not supported")
        if hf.get("use_bidirectional_attention") == "all":
            raise UnsupportedModelError("gemma4 with use_bidirectional_attention 'all' is not a causal LM; not supported")
        layers = field(hf, "num_hidden_layers")
        layer_types = list(hf.get("layer_types") or [
            "sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)])  # transformers' default
        if len(layer_types) != layers:
            raise CheckpointError(
                f"config.json of this gemma4 checkpoint lists {len(layer_types)} layer_types for {layers} layers "
                "(num_hidden_layers); give one entry per layer")
        unknown = sorted(set(layer_types) - set(LAYER_TYPES))
        if unknown:
            raise UnsupportedModelError(f"gemma4 layer_types {unknown} are not supported; moetrt knows {LAYER_TYPES}")
        layer_types[-1] = "full_attention"  # transformers forces the last layer to full attention
        heads = field(hf, "num_attention_heads")
        kv_heads = hf.get("num_key_value_heads") or heads
        head_dim = hf.get("head_dim") or field(hf, "hidden_size") // heads
        k_eq_v = bool(hf.get("attention_k_eq_v", False))
        full_head_dim, full_kv = self._full_layer_shape(hf, layer_types, k_eq_v)
        rope = hf.get("rope_parameters") or {}
        if not set(rope) <= {"sliding_attention", "full_attention"}:
            raise UnsupportedModelError(
                f"gemma4 rope_parameters must be given per layer type (sliding_attention, full_attention), got {sorted(rope)}")
        theta, scaling = _rope_of(rope.get("sliding_attention") or {"rope_type": "default", "rope_theta": 10000.0},
                                  "sliding_attention")
        full_theta, full_scaling = _rope_of(rope.get("full_attention") or {"rope_type": "proportional",
                                            "partial_rotary_factor": 0.25, "rope_theta": 1e6}, "full_attention")
        hidden = field(hf, "hidden_size")
        tie = bool(top.get("tie_word_embeddings", hf.get("tie_word_embeddings", True)))
        return MoEConfig(
            vocab_size=field(hf, "vocab_size"), hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
            num_experts=field(hf, "num_experts"), num_experts_per_tok=field(hf, "top_k_experts"),
            intermediate_size=field(hf, "moe_intermediate_size"), dense_intermediate_size=field(hf, "intermediate_size"),
            activation="gelu_tanh", normalize_topk=True, qk_norm="head",
            attention_bias=bool(hf.get("attention_bias", False)), attention_out_bias=bool(hf.get("attention_bias", False)),
            sliding_window=field(hf, "sliding_window"), layer_types=tuple(layer_types),
            rope_theta=theta, rope_scaling=scaling, max_position_embeddings=hf.get("max_position_embeddings", 131072),
            rms_norm_eps=hf.get("rms_norm_eps", self.default_rms_norm_eps), tie_word_embeddings=tie,
            bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"),
            embedding_multiplier=float(hidden**0.5), final_logit_softcapping=hf.get("final_logit_softcapping"),
            attention_scale=1.0, value_norm=True, sandwich_norms=True, moe_beside_dense=True, router_norm=True,
            layer_scalar=True, full_attention_head_dim=full_head_dim if full_head_dim != head_dim else None,
            full_attention_kv_heads=full_kv if full_kv != kv_heads else None, full_attention_k_eq_v=k_eq_v,
            full_attention_rope_theta=full_theta, full_attention_rope_scaling=full_scaling,
            model_type=self.model_type,
        )

    @staticmethod
    def _full_layer_shape(hf: dict[str, Any], layer_types: list[str], k_eq_v: bool) -> tuple[int, int]:
        """(head_dim, key/value heads) of the full-attention layers, as transformers resolves them."""
        heads = hf.get("num_key_value_heads") or hf["num_attention_heads"]
        per_layer = hf.get("per_layer_config")
        if per_layer is None:  # transformers' __post_init__: global_head_dim (default 512), kv heads where k_eq_v
            per_layer = {}
            overrides = {"head_dim": hf.get("global_head_dim", 512)}
            if k_eq_v and hf.get("num_global_key_value_heads") is not None:
                overrides["num_key_value_heads"] = hf["num_global_key_value_heads"]
            per_layer = {i: overrides for i, t in enumerate(layer_types) if t == "full_attention"}
        per_layer = {int(i): dict(v) for i, v in per_layer.items()}
        full = [i for i, t in enumerate(layer_types) if t == "full_attention"]
        shapes = {(per_layer.get(i, {}).get("head_dim", hf.get("head_dim")),
                   per_layer.get(i, {}).get("num_key_value_heads", heads)) for i in full}
        stray = sorted(set(per_layer) - set(full))
        extra = sorted({k for v in per_layer.values() for k in v} - {"head_dim", "num_key_value_heads"})
        if stray or extra or len(shapes) > 1:
            raise UnsupportedModelError(
                "gemma4 per_layer_config must give every full-attention layer the same head_dim / num_key_value_heads "
                f"and nothing else (got {per_layer}); moetrt supports one shape for full layers, one for sliding ones")
        return shapes.pop() if shapes else (hf.get("head_dim"), heads)

    # --- MoEConfig -> config.json ----------------------------------------------------------------
    def inexpressible(self, cfg: MoEConfig) -> list[str]:
        problems = self.common_inexpressible(cfg)
        wanted = dict(activation="gelu_tanh", normalize_topk=True, qk_norm="head", attention_scale=1.0, value_norm=True,
                      sandwich_norms=True, moe_beside_dense=True, router_norm=True, layer_scalar=True, clip_qkv=None,
                      embedding_multiplier=float(cfg.hidden_size**0.5), shared_expert_intermediate_size=0,
                      attention_out_bias=cfg.attention_bias)
        problems += [f"{k}={getattr(cfg, k)!r} (gemma4 has {v!r})" for k, v in wanted.items() if getattr(cfg, k) != v]
        if cfg.moe_layers != list(range(cfg.num_hidden_layers)):
            problems.append("layers without the MoE block")
        if cfg.layer_types is None or cfg.layer_types[-1] != "full_attention":
            problems.append("layer_types whose last layer is not full attention (gemma4 forces it)")
        if cfg.rope_scaling is not None:
            problems.append(f"sliding layers' RoPE scaling {cfg.rope_scaling!r} (gemma4 has plain RoPE there)")
        return problems

    def hf_config(self, cfg: MoEConfig) -> dict[str, Any]:
        full_rope = {"rope_type": "default", "rope_theta": cfg.full_attention_rope_theta or cfg.rope_theta}
        if cfg.full_attention_rope_scaling is not None:
            full_rope.update(cfg.full_attention_rope_scaling)
        full = [i for i in range(cfg.num_hidden_layers) if cfg.is_full_attention(i)]
        return dict(
            hidden_act=None, hidden_activation="gelu_pytorch_tanh", num_experts=cfg.num_experts,
            top_k_experts=cfg.num_experts_per_tok, moe_intermediate_size=cfg.intermediate_size,
            intermediate_size=cfg.dense_ffn_size, enable_moe_block=True, hidden_size_per_layer_input=0,
            num_kv_shared_layers=0, attention_k_eq_v=cfg.full_attention_k_eq_v, attention_bias=cfg.attention_bias,
            sliding_window=cfg.sliding_window, layer_types=list(cfg.layer_types),
            final_logit_softcapping=cfg.final_logit_softcapping, num_experts_per_tok=None,
            rope_theta=None, rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                                              "full_attention": full_rope},
            per_layer_config={str(i): {"head_dim": cfg.full_head_dim, "num_key_value_heads": cfg.full_kv_heads}
                              for i in full},
        )

    # --- tensors ---------------------------------------------------------------------------------
    def canonical_name(self, name: str) -> str:
        if name.startswith(self.text_prefix):
            name = name[len(self.text_prefix):]
        elif name != "lm_head.weight":
            return "\0" + name  # no text-model tensor (a vision or audio tower)
        for old, new in _RENAMES:
            name = name.replace(old, new)
        return name

    def stored_name(self, name: str) -> str:
        for old, new in reversed(_RENAMES):
            name = name.replace(new, old)
        return name

    def place(self, name: str, shape: tuple[int, ...], cfg: MoEConfig,
              params: dict[str, tuple[int, ...]]) -> list[Placement] | str | None:
        canon = self.canonical_name(name)
        if canon.startswith("\0"):
            return SKIPPED
        if canon.endswith(".router.per_expert_scale"):
            return COMPANION  # folded into the experts' down projections
        if canon.endswith(".mlp.experts.down_proj"):
            if canon not in params:
                return None
            scale = name[: -len("experts.down_proj")] + "router.per_expert_scale"
            return [Placement(canon, transform=_fold_expert_scale, stored_shape=params[canon], needs=(scale,))]
        return super().place(name, shape, cfg, params)

    def hf_tensors(self, model: "MoETransformer") -> Iterator[tuple[str, torch.Tensor]]:
        cfg = model.config
        for prefix, name, tensor in self.saved_tensors(model):
            yield prefix + self.stored_name(name), tensor
            if name.endswith(".mlp.experts.down_proj"):  # the scales live in down_proj (folded on import)
                layer = name[: -len(".mlp.experts.down_proj")]
                yield f"model.{layer}.router.per_expert_scale", torch.ones(cfg.num_experts, dtype=tensor.dtype)

    # --- tests -----------------------------------------------------------------------------------
    def tiny_config(self, **overrides: Any):
        import transformers

        kwargs = {
            "vocab_size": 96, "hidden_size": 64, "intermediate_size": 48, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "global_head_dim": 32,
            "num_global_key_value_heads": 1, "attention_k_eq_v": True, "enable_moe_block": True, "num_experts": 6,
            "top_k_experts": 2, "moe_intermediate_size": 24, "hidden_size_per_layer_input": 0,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
            **overrides,
        }
        return transformers.Gemma4TextConfig(attn_implementation="eager", **kwargs)


@register
class Gemma4(ImageTextFamily, Gemma4Text):
    """The image-text checkpoint (``Gemma4ForConditionalGeneration``): its text model, the towers skipped."""

    model_type = "gemma4"
    architecture = "Gemma4ForConditionalGeneration"
    hf_config_class = "Gemma4Config"
    text_prefix = "model.language_model."
    text_family = Gemma4Text
    tiny_variants = {}  # built by the tests from gemma4_text's (tests/moetrt/test_gemma4.py)
