"""Qwen3.5 / Qwen3.6-MoE: Qwen3-Next's hybrid layers with separate DeltaNet projections.

Two ``model_type`` values name the same language model:

- ``qwen3_5_moe_text``: the text model (``Qwen3_5MoeForCausalLM``), config.json flat;
- ``qwen3_5_moe``: the image-text release (``Qwen3_5MoeForConditionalGeneration``), the language
  model's fields nested under ``text_config``. moetrt imports its text model; the vision tower's
  tensors (``model.visual.*``) are skipped by design (reported in a warning, not an error).

Both store the language model under ``model.language_model.`` (transformers writes the text model's
checkpoints that way too). The router always renormalises its top-k weights; every layer is MoE with
a sigmoid-gated shared expert; RoPE is M-RoPE, which on text positions (equal for its three sections)
is plain (partial) RoPE. Saving writes the text model (``qwen3_5_moe_text``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from moetrt.config import MoEConfig
from moetrt.errors import CheckpointError

from . import register
from ._base import SKIPPED, Placement
from .qwen3_next import HybridQwen

if TYPE_CHECKING:
    from moetrt.model import MoETransformer


@register
class Qwen3_5MoeText(HybridQwen):
    model_type = "qwen3_5_moe_text"
    architecture = "Qwen3_5MoeForCausalLM"
    hf_config_class = "Qwen3_5MoeTextConfig"
    all_layers_moe = True
    tiny_variants = {
        # transformers' own layer pattern (full_attention_interval 2), M-RoPE sections, half the head rotated
        "qwen3_5_moe": dict(
            full_attention_interval=2, attention_bias=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                             "mrope_section": [2, 1, 1], "mrope_interleaved": True},
        ),
    }

    def normalize_topk(self, text: dict[str, Any]) -> bool:
        return True  # Qwen3.5-MoE's router always renormalises

    def inexpressible(self, cfg: MoEConfig) -> list[str]:
        problems = super().inexpressible(cfg)
        if not cfg.normalize_topk:
            problems.append("normalize_topk=False (the family always renormalises)")
        return problems

    def hf_config(self, cfg: MoEConfig) -> dict[str, Any]:
        out = super().hf_config(cfg)
        for name in ("norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "intermediate_size"):
            del out[name]
        return out

    def hf_tensors(self, model: "MoETransformer") -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in super().hf_tensors(model):  # transformers' layout: model.language_model.*
            yield ("model.language_model." + name[len("model."):] if name.startswith("model.") else name), tensor


@register
class Qwen3_5Moe(Qwen3_5MoeText):
    """The image-text release: its text model."""

    model_type = "qwen3_5_moe"
    architecture = "Qwen3_5MoeForConditionalGeneration"
    hf_config_class = "Qwen3_5MoeConfig"
    tiny_variants = {}
    skipped_reason = ("the vision tower (model.visual.*) and multi-token-prediction (mtp.*) layers: moetrt imports "
                      "the text model of an image-text checkpoint")

    def text_config(self, hf: dict[str, Any]) -> dict[str, Any]:
        text = hf.get("text_config")
        if not isinstance(text, dict):
            raise CheckpointError("config.json of this qwen3_5_moe checkpoint lacks the text_config object; "
                                  "re-download the config.json that came with the weights")
        # token ids and embedding tying may sit at the top level of the image-text config
        top = {k: hf[k] for k in ("tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
               if hf.get(k) is not None}
        return {**top, **{k: v for k, v in text.items() if v is not None}}

    def hf_config(self, cfg: MoEConfig) -> dict[str, Any]:
        # a saved model is the text model (a config.json without a vision tower)
        return {**super().hf_config(cfg), "model_type": Qwen3_5MoeText.model_type,
                "architectures": [Qwen3_5MoeText.architecture]}

    def place(self, name: str, shape: tuple[int, ...], cfg: MoEConfig,
              params: dict[str, tuple[int, ...]]) -> list[Placement] | str | None:
        if name.startswith(("model.visual.", "visual.")):
            return SKIPPED
        return super().place(name, shape, cfg, params)
