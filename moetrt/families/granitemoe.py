"""Granite-MoE (``model_type`` ``granitemoe``: IBM's granite-3.0 MoE models, PowerMoE) and Granite-MoE with a
shared expert (``granitemoeshared``).

What transformers' ``GraniteMoeForCausalLM`` computes, and how moetrt holds it:

- the embeddings times ``embedding_multiplier`` (``MoEConfig.embedding_multiplier``);
- attention as Llama's with the softmax scale ``attention_multiplier`` instead of ``head_dim^-0.5``
  (``attention_scale``); ``attention_bias`` on q, k, v and o together;
- each sublayer's output (attention, then the experts) times ``residual_multiplier`` before the
  residual add (``residual_multiplier``);
- router: ``Linear(D, E)`` logits, their top ``k``, softmax over those ``k``. That is softmax over all
  ``E`` experts, the ``k`` best, renormalised over the ``k`` (``exp(l_i) / sum_k exp(l_j)`` either way):
  ``TopKRouting(softmax, normalize=1)``, Mixtral's routing. SwiGLU experts;
- the logits divided by ``logits_scaling`` (``logits_scaling``);
- ``granitemoeshared``: an ungated SwiGLU shared expert of ``shared_intermediate_size`` beside the
  routed ones, summed before the residual multiplier (``shared_expert_gate=False``).

Checkpoint layout on disk: ``model.layers.{i}.block_sparse_moe.input_linear.weight`` ``[E, 2F, D]``
(gate rows then up rows), ``output_linear.weight`` ``[E, D, F]``, ``router.layer.weight`` ``[E, D]``;
transformers v5 in memory: ``block_sparse_moe.experts.{gate_up_proj,down_proj}`` and
``block_sparse_moe.router.weight``. The shared expert: ``shared_mlp.input_linear.weight`` ``[2S, D]``
(gate rows then up rows) and ``shared_mlp.output_linear.weight`` ``[D, S]``. Both namings are read;
``save_pretrained`` writes the on-disk one.

Refused, with the reason: activations other than SwiGLU. Granite-MoE-Hybrid (``granitemoehybrid``, its
Mamba2 layers) is another model_type, refused as unsupported.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from moetrt.config import MoEConfig

from ._base import Family, Placement, field, rope
from . import register

if TYPE_CHECKING:
    from moetrt.model import MoETransformer

# on-disk / transformers names -> moetrt's
_RENAMES = (
    (".block_sparse_moe.input_linear.weight", ".mlp.experts.gate_up_proj"),
    (".block_sparse_moe.output_linear.weight", ".mlp.experts.down_proj"),
    (".block_sparse_moe.router.layer.weight", ".mlp.gate.weight"),
    (".block_sparse_moe.router.weight", ".mlp.gate.weight"),
    (".block_sparse_moe.experts.", ".mlp.experts."),
    (".shared_mlp.output_linear.weight", ".mlp.shared_expert.down_proj.weight"),
)
_SHARED_GATE_UP = ".shared_mlp.input_linear.weight"


@register
class GraniteMoe(Family):
    model_type = "granitemoe"
    architecture = "GraniteMoeForCausalLM"
    hf_config_class = "GraniteMoeConfig"
    default_rms_norm_eps = 1e-6
    expresses = frozenset({"residual_multiplier", "logits_scaling"})
    tiny_variants = {
        # every feature on: all four multipliers away from 1 (the attention scale 0.2, not head_dim^-0.5 = 0.25),
        # q/k/v/o biases, 6 experts top-2
        "granitemoe": dict(
            num_local_experts=6, intermediate_size=32, attention_bias=True, embedding_multiplier=2.5,
            residual_multiplier=0.6, attention_multiplier=0.2, logits_scaling=1.7,
        ),
    }

    # --- config ----------------------------------------------------------------------------------
    def config_from_hf(self, hf: dict[str, Any]) -> MoEConfig:
        common = self.common_config(hf, field(hf, "num_local_experts", "num_experts"))
        bias = bool(hf.get("attention_bias", False))
        return MoEConfig(
            **common, intermediate_size=field(hf, "intermediate_size"), normalize_topk=True,
            attention_bias=bias, attention_out_bias=bias, **self.shared(hf),
            embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
            residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
            attention_scale=float(hf.get("attention_multiplier", 1.0)),
            logits_scaling=float(hf.get("logits_scaling", 1.0)),
            **rope(hf, 10000.0),
        )

    def shared(self, hf: dict[str, Any]) -> dict[str, Any]:
        """The shared expert's MoEConfig fields (none for granitemoe)."""
        return {}

    # --- MoEConfig -> config.json ----------------------------------------------------------------
    def inexpressible(self, cfg: MoEConfig) -> list[str]:
        problems = self.common_inexpressible(cfg) + self.layout_inexpressible(cfg)
        if not cfg.normalize_topk:
            problems.append("normalize_topk=False (Granite-MoE's softmax over the top-k logits always renormalises)")
        if cfg.attention_bias != cfg.attention_out_bias:
            problems.append(f"attention_bias={cfg.attention_bias}, attention_out_bias={cfg.attention_out_bias} together")
        if cfg.attention_scale is None:
            problems.append("attention_scale None (Granite-MoE states its attention_multiplier)")
        wanted = dict(clip_qkv=None, sliding_window=None, final_logit_softcapping=None, value_norm=False,
                      sandwich_norms=False, moe_beside_dense=False, router_norm=False, layer_scalar=False,
                      full_attention_head_dim=None, full_attention_kv_heads=None, full_attention_k_eq_v=False,
                      attention_output_gate=False, rms_norm_unit_offset=False)
        problems += [f"{k}={getattr(cfg, k)!r} (granitemoe has {v!r})" for k, v in wanted.items() if getattr(cfg, k) != v]
        return problems

    def hf_config(self, cfg: MoEConfig) -> dict[str, Any]:
        return dict(
            num_local_experts=cfg.num_experts, intermediate_size=cfg.intermediate_size,
            attention_bias=cfg.attention_bias, embedding_multiplier=cfg.embedding_multiplier,
            residual_multiplier=cfg.residual_multiplier, attention_multiplier=cfg.attention_scale,
            logits_scaling=cfg.logits_scaling,
        )

    # --- tensors ---------------------------------------------------------------------------------
    def canonical_name(self, name: str) -> str:
        name = super().canonical_name(name)
        for old, new in _RENAMES:
            name = name.replace(old, new)
        return name

    def place(self, name: str, shape: tuple[int, ...], cfg: MoEConfig,
              params: dict[str, tuple[int, ...]]) -> list[Placement] | str | None:
        canon = super().canonical_name(name)
        if canon.endswith(_SHARED_GATE_UP):  # [2S, D]: the shared expert's gate rows, then its up rows
            base = canon[: -len(_SHARED_GATE_UP)] + ".mlp.shared_expert"
            gate, up = f"{base}.gate_proj.weight", f"{base}.up_proj.weight"
            if gate not in params:
                return None
            size = params[gate][0]
            stored = (2 * size, params[gate][1])
            return [Placement(gate, transform=lambda t: t[:size], stored_shape=stored),
                    Placement(up, transform=lambda t: t[size:], stored_shape=stored)]
        return super().place(name, shape, cfg, params)

    def hf_tensors(self, model: "MoETransformer") -> Iterator[tuple[str, torch.Tensor]]:
        state = model.state_dict()
        on_disk = _RENAMES[:3] + _RENAMES[5:]  # input_linear, output_linear, router.layer, shared output_linear
        for prefix, name, tensor in self.saved_tensors(model):
            if name.endswith(".mlp.shared_expert.up_proj.weight"):
                continue  # written with its gate rows
            if name.endswith(".mlp.shared_expert.gate_proj.weight"):
                layer = name[: -len(".mlp.shared_expert.gate_proj.weight")]
                up = state[f"{layer}.mlp.shared_expert.up_proj.weight"]
                yield f"{prefix}{layer}{_SHARED_GATE_UP}", torch.cat((tensor, up))  # [2S, D]
                continue
            for old, new in on_disk:
                name = name.replace(new, old)
            yield prefix + name, tensor


@register
class GraniteMoeShared(GraniteMoe):
    """Granite-MoE with an ungated shared expert beside the routed ones."""

    model_type = "granitemoeshared"
    architecture = "GraniteMoeSharedForCausalLM"
    hf_config_class = "GraniteMoeSharedConfig"
    tiny_variants = {
        "granitemoeshared": dict(
            num_local_experts=6, intermediate_size=32, shared_intermediate_size=40, attention_bias=True,
            embedding_multiplier=2.5, residual_multiplier=0.6, attention_multiplier=0.2, logits_scaling=1.7,
        ),
    }

    def shared(self, hf: dict[str, Any]) -> dict[str, Any]:
        size = int(hf.get("shared_intermediate_size") or 0)
        return dict(shared_expert_intermediate_size=size, shared_expert_gate=False)

    def shared_expert_problems(self, cfg: MoEConfig) -> list[str]:
        return ["a gated shared expert"] if cfg.shared_expert_intermediate_size and cfg.shared_expert_gate else []

    def hf_config(self, cfg: MoEConfig) -> dict[str, Any]:
        return {**super().hf_config(cfg), "shared_intermediate_size": cfg.shared_expert_intermediate_size}
