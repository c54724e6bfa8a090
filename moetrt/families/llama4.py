"""Llama 4 (``model_type`` ``llama4_text``: the text model, ``Llama4ForCausalLM``; ``llama4``: the
image-text checkpoints meta-llama/Llama-4-Scout-17B-16E and -Maverick-17B-128E, whose text model
moetrt imports).

What transformers' ``Llama4ForCausalLM`` computes, and how moetrt holds it:

- router: ``Linear(D, E)`` logits, the top-k (Scout and Maverick: top-1) on the raw logits, the
  sigmoid of each chosen logit (``TopKRouting(sigmoid, normalize=0)``: sigmoid is monotonic, so the
  same experts win); that score scales the expert's *input*, not its output
  (``SparseMoE(weight_input=1)``, ``MoEConfig.expert_input_weighting``): with SwiGLU the two differ;
- an ungated shared expert of the experts' size beside them (``shared_expert_intermediate_size``
  = ``intermediate_size``, ``shared_expert_gate`` off);
- MoE and dense layers interleaved (``moe_layers``, or every ``interleave_moe_layer_step``-th
  layer): dense layers are SwiGLU MLPs of ``intermediate_size_mlp``;
- attention: ``layer_types`` ``chunked_attention`` layers attend within chunks of
  ``attention_chunk_size`` positions, counted from a row's first real token
  (``MoEConfig.attention_chunk_size``); ``no_rope_layers`` (0 = NoPE) rotate nothing
  (``nope_layers``) and, with ``attn_temperature_tuning``, scale their queries by
  ``1 + attn_scale * log1p(floor((p + 1) / floor_scale))`` at cache position ``p``; with
  ``use_qk_norm`` the rotating layers L2-normalise queries and keys per head after the rotation
  (a weightless RMSNorm: ``qk_norm="l2"``); ``llama3`` RoPE scaling.
- RoPE rotates interleaved pairs (dims ``2i, 2i+1``, transformers' complex form); moetrt rotates
  halves (``i, i + Hd/2``), so the rows of ``q_proj`` and ``k_proj`` are permuted per head on
  import (and back on save): every q.k product, and the per-head norms, are unchanged; the cached
  keys hold the permuted dims.

Refused, with the reason: quantized checkpoints (``quantization_config``), an activation other than
SiLU, ``layer_types`` other than ``full_attention`` / ``chunked_attention``.

Checkpoint layout: ``model.layers.{i}.feed_forward.router.weight`` ``[E, D]``,
``feed_forward.experts.gate_up_proj`` ``[E, D, 2F]`` (gate columns then up columns) and
``down_proj`` ``[E, F, D]``, ``feed_forward.shared_expert.{gate,up,down}_proj``; dense layers
``feed_forward.{gate,up,down}_proj``; the image-text checkpoint holds the text model under
``language_model.model.`` (``language_model.lm_head``) beside the vision tower and projector
(skipped). moetrt names the feed-forward ``layers.{i}.mlp`` and the router ``mlp.gate``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from moetrt.config import MoEConfig
from moetrt.errors import CheckpointError, UnsupportedModelError

from ._base import SKIPPED, Family, ImageTextFamily, Placement, field, rope
from . import register

if TYPE_CHECKING:
    from moetrt.model import MoETransformer

# the on-disk names -> moetrt's (the router first: it leaves "feed_forward." before the rest take it)
_RENAMES = ((".feed_forward.router.", ".mlp.gate."), (".feed_forward.", ".mlp."))
_LAYER_TYPES = ("full_attention", "chunked_attention")


def _interleaved_to_halves(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of a q/k projection (weight [H*Hd, D] or bias [H*Hd]), per head: dims 0, 2, 4, ... then 1, 3, 5, ..."""
    heads = t.shape[0] // head_dim
    perm = torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))
    return t.reshape(heads, head_dim, *t.shape[1:])[:, perm].reshape(t.shape).contiguous()


def _halves_to_interleaved(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The inverse of :func:`_interleaved_to_halves`."""
    heads = t.shape[0] // head_dim
    perm = torch.stack((torch.arange(head_dim // 2), torch.arange(head_dim // 2, head_dim)), dim=1).reshape(-1)
    return t.reshape(heads, head_dim, *t.shape[1:])[:, perm].reshape(t.shape).contiguous()


def _expert_t(t: torch.Tensor) -> torch.Tensor:  # one expert's [D, 2F] -> [2F, D], or [F, D] -> [D, F]
    return t.transpose(0, 1).contiguous()


@register
class Llama4Text(Family):
    model_type = "llama4_text"
    architecture = "Llama4ForCausalLM"
    hf_config_class = "Llama4TextConfig"
    family_qk_norm = "l2"
    all_layers_moe = False
    expresses = frozenset({"scoring", "layer_types"})
    skipped_reason = "the vision tower and projector of an image-text checkpoint (moetrt imports its text model)"
    # where the text model's tensors live in the checkpoint ("model.": Llama4ForCausalLM)
    text_prefix = "model."
    lm_head_name = "lm_head.weight"
    tiny_variants = {
        # every feature on: layers 0, 2 chunked RoPE layers (chunk 4, shorter than the prompts) with the L2 q/k
        # norm; layers 1, 3 NoPE full-attention layers with temperature tuning (floor_scale 2, so positions
        # past 1 are scaled); MoE on layers 1, 3 (interleave step 2), dense MLPs of another size on 0, 2;
        # llama3 RoPE scaling; top-1 of 4 experts beside the shared expert
        "llama4_text": dict(),
        # top-2 of 4 (the op takes any k), MoE on every layer, no q/k norm, no temperature tuning, a chunk of 6
        "llama4_text-top2": dict(num_experts_per_tok=2, interleave_moe_layer_step=1, use_qk_norm=False,
                                 attn_temperature_tuning=False, attention_chunk_size=6, num_hidden_layers=3),
    }

    # --- config ----------------------------------------------------------------------------------
    def config_from_hf(self, hf: dict[str, Any]) -> MoEConfig:
        self.refuse_quantized(hf)
        top, hf = hf, self.text_config(hf)
        layers = field(hf, "num_hidden_layers")
        # transformers' Llama4TextConfig.__post_init__, default for default
        interval = hf.get("no_rope_layer_interval", 4)
        no_rope = list(hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)])
        if len(no_rope) < layers:
            raise CheckpointError(
                f"config.json of this llama4 checkpoint lists {len(no_rope)} no_rope_layers for {layers} layers "
                "(num_hidden_layers); give one entry per layer")
        step = hf.get("interleave_moe_layer_step", 1)
        moe_layers = hf.get("moe_layers")
        moe_layers = list(range(step - 1, layers, step)) if moe_layers is None else [int(i) for i in moe_layers]
        chunk = hf.get("attention_chunk_size", 8192)
        layer_types = list(hf.get("layer_types") or [
            "chunked_attention" if r and chunk is not None else "full_attention" for r in no_rope[:layers]])
        if len(layer_types) != layers:
            raise CheckpointError(
                f"config.json of this llama4 checkpoint lists {len(layer_types)} layer_types for {layers} layers "
                "(num_hidden_layers); give one entry per layer")
        unknown = sorted(set(layer_types) - set(_LAYER_TYPES))
        if unknown:
            raise UnsupportedModelError(f"llama4 layer_types {unknown} are not supported; moetrt knows {_LAYER_TYPES}")
        if "chunked_attention" not in layer_types:
            chunk = None
        base = self.common_config(hf, field(hf, "num_local_experts"))
        ffn = field(hf, "intermediate_size")
        attention_bias = bool(hf.get("attention_bias", False))
        return MoEConfig(
            **{**base, "max_position_embeddings": hf.get("max_position_embeddings", 4096 * 32),
               "tie_word_embeddings": bool(top.get("tie_word_embeddings", hf.get("tie_word_embeddings", False)))},
            intermediate_size=ffn, dense_intermediate_size=hf.get("intermediate_size_mlp", 16384),
            scoring="sigmoid", normalize_topk=False, expert_input_weighting=True,
            shared_expert_intermediate_size=ffn, shared_expert_gate=False,
            mlp_only_layers=tuple(i for i in range(layers) if i not in moe_layers),
            qk_norm="l2" if hf.get("use_qk_norm", True) else None,
            attention_bias=attention_bias, attention_out_bias=attention_bias,
            layer_types=tuple(layer_types), attention_chunk_size=chunk,
            nope_layers=tuple(i for i in range(layers) if not no_rope[i]),
            attn_temperature_tuning=bool(hf.get("attn_temperature_tuning", True)),
            attn_floor_scale=float(hf.get("floor_scale", 8192)), attn_scale=float(hf.get("attn_scale", 0.1)),
            **rope(hf, 500000.0),
        )

    # --- MoEConfig -> config.json ----------------------------------------------------------------
    def inexpressible(self, cfg: MoEConfig) -> list[str]:
        problems = self.common_inexpressible(cfg)
        wanted = dict(scoring="sigmoid", normalize_topk=False, routed_scaling_factor=1.0, expert_input_weighting=True,
                      shared_expert_intermediate_size=cfg.intermediate_size, shared_expert_gate=False,
                      decoder_sparse_step=1, clip_qkv=None, sliding_window=None, attention_out_bias=cfg.attention_bias,
                      embedding_multiplier=1.0, final_logit_softcapping=None, attention_scale=None)
        problems += [f"{k}={getattr(cfg, k)!r} (llama4 has {v!r})" for k, v in wanted.items() if getattr(cfg, k) != v]
        if cfg.qk_norm not in ("l2", None):
            problems.append(f"qk_norm={cfg.qk_norm!r} (llama4 has 'l2' or none)")
        if cfg.layer_types is None or set(cfg.layer_types) - set(_LAYER_TYPES):
            problems.append(f"layer_types {cfg.layer_types!r} (llama4 has full_attention and chunked_attention)")
        return problems

    def hf_config(self, cfg: MoEConfig) -> dict[str, Any]:
        return dict(
            num_local_experts=cfg.num_experts, intermediate_size=cfg.intermediate_size,
            intermediate_size_mlp=cfg.dense_ffn_size, moe_layers=cfg.moe_layers, interleave_moe_layer_step=1,
            use_qk_norm=cfg.qk_norm == "l2",
            no_rope_layers=[int(cfg.uses_rope(i)) for i in range(cfg.num_hidden_layers)],
            attention_chunk_size=cfg.attention_chunk_size, layer_types=list(cfg.layer_types),
            attn_temperature_tuning=cfg.attn_temperature_tuning, floor_scale=int(cfg.attn_floor_scale)
            if float(cfg.attn_floor_scale).is_integer() else cfg.attn_floor_scale,
            attn_scale=cfg.attn_scale, attention_bias=cfg.attention_bias, rope_theta=None,
        )

    # --- tensors ---------------------------------------------------------------------------------
    def canonical_name(self, name: str) -> str:
        if name == self.lm_head_name:
            return "lm_head.weight"
        if not name.startswith(self.text_prefix):
            return "\0" + name  # no text-model tensor (the vision tower or projector)
        name = name[len(self.text_prefix):]
        for old, new in _RENAMES:
            name = name.replace(old, new)
        return name

    def stored_name(self, name: str) -> str:
        for old, new in _RENAMES:  # the router first here too: ".mlp.gate." before the other ".mlp."
            name = name.replace(new, old)
        return name

    def place(self, name: str, shape: tuple[int, ...], cfg: MoEConfig,
              params: dict[str, tuple[int, ...]]) -> list[Placement] | str | None:
        canon = self.canonical_name(name)
        if canon.startswith("\0"):
            return SKIPPED
        if canon.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            if canon not in params:
                return None
            E, D, F = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
            stored = (E, D, 2 * F) if canon.endswith("gate_up_proj") else (E, F, D)
            return [Placement(canon, e, transform=_expert_t, stored_shape=stored, select=e) for e in range(E)]
        if canon.endswith((".self_attn.q_proj.weight", ".self_attn.k_proj.weight", ".self_attn.q_proj.bias",
                           ".self_attn.k_proj.bias")):
            if canon not in params:
                return None
            head_dim = cfg.head_dim
            return [Placement(canon, transform=lambda t: _interleaved_to_halves(t, head_dim),
                              stored_shape=params[canon])]
        return super().place(name, shape, cfg, params)

    def hf_tensors(self, model: "MoETransformer") -> Iterator[tuple[str, torch.Tensor]]:
        head_dim = model.config.head_dim
        for prefix, name, tensor in self.saved_tensors(model):
            if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):  # [E, 2F, D] -> [E, D, 2F]; down alike
                tensor = tensor.transpose(1, 2)
            elif name.endswith((".self_attn.q_proj.weight", ".self_attn.k_proj.weight", ".self_attn.q_proj.bias",
                                ".self_attn.k_proj.bias")):
                tensor = _halves_to_interleaved(tensor, head_dim)
            yield prefix + self.stored_name(name), tensor

    # --- tests -----------------------------------------------------------------------------------
    def tiny_config(self, **overrides: Any):
        return super().tiny_config(**{
            "intermediate_size": 32, "intermediate_size_mlp": 48, "num_hidden_layers": 4, "head_dim": 16,
            "num_local_experts": 4, "num_experts_per_tok": 1, "interleave_moe_layer_step": 2, "use_qk_norm": True,
            "no_rope_layer_interval": 2, "attention_chunk_size": 4, "attn_temperature_tuning": True, "floor_scale": 2,
            "attn_scale": 0.5, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 16},
            **overrides,
        })


@register
class Llama4(ImageTextFamily, Llama4Text):
    """The image-text checkpoint (``Llama4ForConditionalGeneration``): its text model, the vision tower skipped."""

    model_type = "llama4"
    architecture = "Llama4ForConditionalGeneration"
    hf_config_class = "Llama4Config"
    text_prefix = "language_model.model."
    lm_head_name = "language_model.lm_head.weight"
    text_family = Llama4Text
    tiny_variants = {}  # built by the tests from llama4_text's (tests/moetrt/test_llama4.py)
