"""ERNIE-4.5-MoE (``model_type`` ``ernie4_5_moe``: ERNIE-4.5-21B-A3B, ERNIE-4.5-300B-A47B text models).

What transformers' ``Ernie4_5_MoeForCausalLM`` computes, and how moetrt holds it:

- router: ``softmax(Linear(D, E))`` in float32; ``moe_statics.e_score_correction_bias`` ``[1, E]``
  added to the scores chooses the ``moe_k`` experts only (the weights are the unbiased scores),
  which are then divided by ``max(their sum, moe_norm_min)``:
  ``TopKRouting(softmax, selection_bias, normalize=1, norm_min=moe_norm_min)`` (``norm_min``:
  TopKRouting version 3);
- ``moe_num_shared_experts`` shared experts, ungated, summed with the routed ones (one dense MLP of
  ``moe_num_shared_experts * moe_intermediate_size``);
- layer ``i`` is an MoE layer iff ``(i + 1) % moe_layer_interval == 0`` and
  ``moe_layer_start_index <= i <= moe_layer_end_index`` (``-1``: the last layer); the others run a
  dense MLP of ``intermediate_size`` (``decoder_sparse_step`` and ``mlp_only_layers``);
- ``use_bias`` puts a bias on q/k/v/o, on every dense and shared-expert projection and on
  ``lm_head`` (the routed experts and the router have none);
- RoPE on interleaved pairs (transformers' ``rotate_half`` of this model takes dims 0::2 and 1::2,
  and repeats each frequency twice): moetrt permutes each head's rows of ``q_proj`` and ``k_proj``
  (weights and biases) once on the way in, evens then odds, after which its rotate-half RoPE
  computes exactly the same scores; the cached keys hold the permuted dims (``save_pretrained``
  interleaves the rows back);
- tied embeddings by default (``tie_word_embeddings``).

Checkpoint layout: ``mlp.gate.weight`` ``[E, D]``, ``mlp.moe_statics.e_score_correction_bias``
``[1, E]`` (transformers' in-memory name ``mlp.gate.moe_statics.e_score_correction_bias`` is read
too), the experts one tensor per projection (``mlp.experts.{e}.{gate,up,down}_proj.weight``) or
stacked, ``mlp.shared_experts.*``. Multi-token-prediction tensors (names holding ``mtp``) are
skipped, as transformers skips them.

Refused by name: the image-text ERNIE-4.5-VL (``ernie4_5_vl_moe``: its vision tower and the
text/vision expert split), dense ERNIE-4.5 (``ernie4_5``), quantized checkpoints, other activations.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from moetrt.config import MoEConfig
from moetrt.errors import UnsupportedModelError

from ._base import SKIPPED, Family, Placement, field, rope
from .deepseek_v3 import _deinterleave, _interleave, _permute_rope_rows, _then
from . import refuse, register

if TYPE_CHECKING:
    from moetrt.model import MoETransformer

refuse("ernie4_5_vl_moe", "ERNIE-4.5-VL is an image-text model whose MoE layers route text and vision tokens to "
       "separate expert sets; moetrt reads the text-only ERNIE-4.5-MoE (ernie4_5_moe)")
refuse("ernie4_5", "ERNIE-4.5 (ernie4_5) is a dense model; moetrt is for the Mixture-of-Experts ERNIE-4.5-MoE "
       "(ernie4_5_moe)")

_STATICS = (".mlp.moe_statics.e_score_correction_bias", ".mlp.gate.moe_statics.e_score_correction_bias")


@register
class Ernie45Moe(Family):
    model_type = "ernie4_5_moe"
    architecture = "Ernie4_5_MoeForCausalLM"
    hf_config_class = "Ernie4_5_MoeConfig"
    default_rms_norm_eps = 1e-5
    all_layers_moe = False
    expresses = frozenset({"selection_bias", "norm_min", "mlp_bias", "lm_head_bias"})
    skipped_reason = "multi-token-prediction layers (mtp); transformers does not load them either"
    tiny_variants = {
        # every feature on: biases everywhere (use_bias), 2 shared experts, a selection bias, norm_min 0.4 (above
        # the top-2 sum of some tokens, so the clamp acts), MoE layers 1..2 of 4 (layer 0 dense by the start
        # index, layer 3 by the end index), interleaved RoPE, tied embeddings
        "ernie4_5_moe": dict(
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, intermediate_size=40, moe_num_shared_experts=2,
            num_hidden_layers=4, moe_layer_start_index=1, moe_layer_end_index=2, moe_layer_interval=1,
            moe_norm_min=0.4, use_bias=True, tie_word_embeddings=True,
        ),
        # the released configs' other branches: MoE on every second layer (moe_layer_interval 2, end index -1),
        # norm_min 1e-12, no biases, untied embeddings, one shared expert, top-3 of 6
        "ernie4_5_moe-interval": dict(
            num_experts=6, num_experts_per_tok=3, moe_intermediate_size=20, intermediate_size=48, moe_num_shared_experts=1,
            num_hidden_layers=4, moe_layer_start_index=0, moe_layer_end_index=-1, moe_layer_interval=2,
            moe_norm_min=1e-12, use_bias=False, tie_word_embeddings=False,
        ),
    }

    # --- config ----------------------------------------------------------------------------------
    def config_from_hf(self, hf: dict[str, Any]) -> MoEConfig:
        quant = hf.get("quantization_config")
        if quant:
            raise UnsupportedModelError(
                f"ernie4_5_moe checkpoints quantized with {quant.get('quant_method')!r} are not supported; "
                "use a bf16 checkpoint (the -PT releases)")
        experts = field(hf, "moe_num_experts", "num_experts")
        k = field(hf, "moe_k", "num_experts_per_tok")
        common = self.common_config({**hf, "num_experts_per_tok": k}, experts)
        layers = common["num_hidden_layers"]
        start = int(hf.get("moe_layer_start_index", 1))
        end = int(hf.get("moe_layer_end_index", -1))
        end = layers - 1 if end == -1 else end  # transformers' Ernie4_5_MoeConfig does the same
        interval = int(hf.get("moe_layer_interval", 1))
        if interval < 1:
            raise UnsupportedModelError(f"ernie4_5_moe moe_layer_interval={interval} is not supported (>= 1)")
        moe_ffn = field(hf, "moe_intermediate_size")
        bias = bool(hf.get("use_bias", False))
        return MoEConfig(
            **common, intermediate_size=moe_ffn, dense_intermediate_size=hf.get("intermediate_size") or moe_ffn,
            scoring="softmax", selection_bias=True, normalize_topk=True,
            norm_min=float(hf.get("moe_norm_min", 1e-12)),
            shared_expert_intermediate_size=int(hf.get("moe_num_shared_experts") or 0) * moe_ffn,
            shared_expert_gate=False,
            decoder_sparse_step=interval,
            mlp_only_layers=tuple(i for i in range(layers) if not start <= i <= end),
            attention_bias=bias, attention_out_bias=bias, mlp_bias=bias, lm_head_bias=bias,
            **rope(hf, 500000.0),
        )

    # --- MoEConfig -> config.json ------------------------------------------------------------------
    @staticmethod
    def moe_layer_range(cfg: MoEConfig) -> tuple[int, int, int] | None:
        """(start, end, interval) that select exactly ``cfg``'s MoE layers, or None."""
        moe = cfg.moe_layers
        interval = cfg.decoder_sparse_step
        start, end = moe[0], moe[-1]
        if moe != [i for i in range(start, end + 1) if (i + 1) % interval == 0]:
            return None
        return start, end, interval

    def inexpressible(self, cfg: MoEConfig) -> list[str]:
        problems = self.common_inexpressible(cfg)
        if cfg.scoring != "softmax" or not cfg.selection_bias or not cfg.normalize_topk:
            problems.append("routing other than softmax with a selection bias and renormalised weights")
        if cfg.qk_norm is not None or cfg.clip_qkv is not None or cfg.sliding_window is not None:
            problems.append("q/k norm, clip_qkv or a sliding window")
        if cfg.shared_expert_intermediate_size and (
            cfg.shared_expert_gate or cfg.shared_expert_intermediate_size % cfg.intermediate_size
        ):
            problems.append("a gated shared expert, or one whose size is no multiple of intermediate_size")
        biases = {cfg.attention_bias, cfg.attention_out_bias, cfg.mlp_bias, cfg.lm_head_bias}
        if len(biases) > 1:
            problems.append("biases on some of attention, MLPs and lm_head but not all (ERNIE's use_bias is one switch)")
        if self.moe_layer_range(cfg) is None:
            problems.append(f"MoE layers {cfg.moe_layers} (ERNIE has a start index, an end index and an interval)")
        return problems

    def hf_config(self, cfg: MoEConfig) -> dict[str, Any]:
        start, end, interval = self.moe_layer_range(cfg)
        return dict(
            moe_num_experts=cfg.num_experts, moe_k=cfg.num_experts_per_tok, moe_intermediate_size=cfg.intermediate_size,
            intermediate_size=cfg.dense_ffn_size,
            moe_num_shared_experts=cfg.shared_expert_intermediate_size // cfg.intermediate_size,
            moe_layer_start_index=start, moe_layer_end_index=end, moe_layer_interval=interval,
            moe_norm_min=cfg.norm_min, use_bias=cfg.attention_bias,
        )

    # --- tensors ---------------------------------------------------------------------------------
    def canonical_name(self, name: str) -> str:
        name = super().canonical_name(name).replace(".mlp.shared_experts.", ".mlp.shared_expert.")
        for statics in _STATICS:
            name = name.replace(statics, ".mlp.selection_bias")
        return name

    def stored_name(self, name: str) -> str:
        return (name.replace(".mlp.shared_expert.", ".mlp.shared_experts.")
                .replace(".mlp.selection_bias", _STATICS[0]))

    def place(self, name: str, shape: tuple[int, ...], cfg: MoEConfig,
              params: dict[str, tuple[int, ...]]) -> list[Placement] | str | None:
        if "mtp" in name:  # transformers' _keys_to_ignore_on_load_unexpected
            return SKIPPED
        canon = self.canonical_name(name)
        if canon.endswith(".mlp.selection_bias") and canon in params:  # stored [1, E]
            return [Placement(canon, transform=lambda t: t.reshape(-1), stored_shape=(1, cfg.num_experts))]
        where = super().place(name, shape, cfg, params)
        proj = canon.rsplit(".", 2)[-2] if canon.count(".") >= 2 else ""
        if proj not in ("q_proj", "k_proj") or not isinstance(where, list):
            return where
        heads = cfg.num_attention_heads if proj == "q_proj" else cfg.num_key_value_heads
        permute = lambda t: _permute_rope_rows(t, heads, 0, cfg.head_dim, _deinterleave)  # noqa: E731
        return [_then(p, permute, params[p.key]) for p in where]

    def hf_tensors(self, model: "MoETransformer") -> Iterator[tuple[str, torch.Tensor]]:
        cfg = model.config
        for name, tensor in super().hf_tensors(model):
            if name.endswith(_STATICS[0]):
                tensor = tensor.reshape(1, -1)
            elif ".self_attn.q_proj." in name or ".self_attn.k_proj." in name:
                heads = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
                tensor = _permute_rope_rows(tensor, heads, 0, cfg.head_dim, _interleave)
            yield name, tensor
