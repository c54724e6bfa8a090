"""DBRX (``model_type`` ``dbrx``: databricks/dbrx-base and dbrx-instruct).

What transformers' ``DbrxForCausalLM`` computes, and how moetrt holds it:

- the config nests attention and experts: ``d_model``, ``n_heads``, ``n_layers``, ``max_seq_len`` at the
  top, ``attn_config`` (``kv_n_heads``, ``clip_qkv``, ``rope_theta``) and ``ffn_config``
  (``ffn_hidden_size``, ``moe_num_experts``, ``moe_top_k``, ``moe_normalize_expert_weights``,
  ``ffn_act_fn``);
- LayerNorm with a weight and no bias (eps 1e-5, ``nn.LayerNorm``'s) before attention (``norm_1``),
  before the experts (``norm_2``) and at the end (``norm_f``): ``MoEConfig.layer_norm``;
- attention: one fused ``Wqkv`` projection (q rows, then k, then v), clamped to
  ``[-clip_qkv, clip_qkv]`` as a whole (the same as clamping q, k and v: ``clip_qkv``), split into
  ``q_proj`` / ``k_proj`` / ``v_proj`` on import and fused again on save; no biases; plain RoPE;
- router: ``Linear(D, E)``, softmax over all experts, the ``k`` best, divided by their
  ``moe_normalize_expert_weights``-norm (``torch.norm(p=...)``): p=1 is their sum (the released
  models; ``TopKRouting(softmax, normalize=1)``, Mixtral's), p=2 the Euclidean norm
  (``normalize=2``), None no renormalisation (``normalize=0``); other p are refused by name.
  ``moe_jitter_eps`` only acts in training (transformers ignores it in eval) and is ignored;
- experts: SwiGLU from ``w1`` (gate) and ``v1`` (up), ``[E * F, D]`` each, and ``w2`` ``[E * F, D]``
  used as ``h @ w2_e``: moetrt's ``down_proj`` ``[E, D, F]`` is each expert's block transposed.
  Each expert's block is read on its own (``Placement.blocks``).

RoPE base: ``attn_config.rope_theta`` is DBRX's own field, what the released models were trained with
(500000) and what transformers 4.x used; transformers 5.x reads the top-level ``rope_parameters``
instead (10000 when a config.json has none, as the released ones). moetrt follows
``attn_config.rope_theta`` and warns where the two disagree; ``save_pretrained`` writes both alike.

Refused, with the reason: tied embeddings (transformers refuses them too), activations other than SiLU.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from moetrt.config import MoEConfig
from moetrt.errors import UnsupportedModelError

from ._base import DERIVED, Family, Placement, field, rope
from . import register

if TYPE_CHECKING:
    from moetrt.model import MoETransformer

# on-disk names -> moetrt's (transformers holds them the same way in memory): leading parts, then inner ones
_PREFIXES = (("transformer.wte.", "embed_tokens."), ("transformer.norm_f.", "norm."), ("transformer.blocks.", "layers."))
_RENAMES = (
    (".norm_attn_norm.norm_1.", ".input_layernorm."),
    (".norm_attn_norm.norm_2.", ".post_attention_layernorm."),
    (".norm_attn_norm.attn.out_proj.", ".self_attn.o_proj."),
    (".ffn.router.layer.", ".mlp.gate."),
)
_WQKV = re.compile(r"^transformer\.blocks\.(\d+)\.norm_attn_norm\.attn\.Wqkv\.weight$")
_EXPERTS = re.compile(r"^transformer\.blocks\.(\d+)\.ffn\.experts\.mlp\.(w1|v1|w2)$")


def _rows(start: int, stop: int):
    return lambda t: t[start:stop]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _transposed(t: torch.Tensor) -> torch.Tensor:
    return t.t()


@register
class Dbrx(Family):
    model_type = "dbrx"
    architecture = "DbrxForCausalLM"
    hf_config_class = "DbrxConfig"
    expresses = frozenset({"normalize_topk_p", "layer_norm"})
    tiny_variants = {
        # every feature on: the Euclidean norm of the top-k weights, clip_qkv (0.6 clamps a share of the q/k/v
        # values), 2 key/value heads for 4 query heads, RoPE base 500000 (attn_config and rope_parameters alike)
        "dbrx": dict(attn_config=dict(kv_n_heads=2, clip_qkv=0.6, rope_theta=500000.0),
                     ffn_config=dict(ffn_hidden_size=32, moe_num_experts=6, moe_top_k=2,
                                     moe_normalize_expert_weights=2.0)),
        # the released models' routing (p=1: the sum) and clip (8: no value of the tiny model reaches it), top-3, one
        # key/value head (DBRX's default). transformers 5.x cannot run clip_qkv None (torch.clamp without bounds)
        "dbrx-sum": dict(attn_config=dict(kv_n_heads=1, clip_qkv=8.0, rope_theta=10000.0),
                         ffn_config=dict(ffn_hidden_size=24, moe_num_experts=5, moe_top_k=3,
                                         moe_normalize_expert_weights=1.0)),
    }

    # --- config ----------------------------------------------------------------------------------
    def config_from_hf(self, hf: dict[str, Any]) -> MoEConfig:
        attn, ffn = hf.get("attn_config") or {}, hf.get("ffn_config") or {}
        act = ffn.get("ffn_act_fn") or {"name": "silu"}
        if act.get("name", "silu") != "silu" or set(act) - {"name"}:
            raise UnsupportedModelError(f"dbrx ffn_config.ffn_act_fn {act!r} is not supported (experts must be SwiGLU: "
                                        "{'name': 'silu'})")
        if hf.get("tie_word_embeddings"):
            raise UnsupportedModelError("dbrx with tie_word_embeddings is not supported (transformers refuses it too)")
        p = ffn.get("moe_normalize_expert_weights", 1.0)  # DbrxFFNConfig's default
        if p is not None and float(p) not in (1.0, 2.0):
            raise UnsupportedModelError(
                f"dbrx ffn_config.moe_normalize_expert_weights={p!r} is not supported; moetrt implements None (no "
                "renormalisation), 1 (the sum) and 2 (the Euclidean norm)")
        heads = field(hf, "n_heads", "num_attention_heads")
        hidden = field(hf, "d_model", "hidden_size")
        positions = rope(hf, 10000.0)  # the top-level rope_parameters transformers 5.x reads
        own = attn.get("rope_theta")
        if own is not None and float(own) != positions["rope_theta"]:
            warnings.warn(
                f"dbrx config.json: attn_config.rope_theta={own} and the top-level RoPE base "
                f"{positions['rope_theta']} differ; moetrt uses attn_config.rope_theta, DBRX's own field (what the "
                "released models were trained with), where transformers 5.x uses the top-level one")
            positions["rope_theta"] = float(own)
        return MoEConfig(
            vocab_size=field(hf, "vocab_size"), hidden_size=hidden, num_hidden_layers=field(hf, "n_layers",
                                                                                            "num_hidden_layers"),
            num_attention_heads=heads, num_key_value_heads=int(attn.get("kv_n_heads", 1)),
            num_experts=int(ffn.get("moe_num_experts", 4)), num_experts_per_tok=int(ffn.get("moe_top_k", 1)),
            intermediate_size=int(ffn.get("ffn_hidden_size", 3584)),  # DbrxFFNConfig's defaults
            normalize_topk=p is not None, normalize_topk_p=1 if p is None else int(p),
            clip_qkv=attn.get("clip_qkv"), layer_norm=True, rms_norm_eps=1e-5,
            max_position_embeddings=hf.get("max_seq_len", 2048), tie_word_embeddings=False,
            bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"),
            model_type=self.model_type, **positions,
        )

    # --- MoEConfig -> config.json ----------------------------------------------------------------
    def inexpressible(self, cfg: MoEConfig) -> list[str]:
        problems = self.common_inexpressible(cfg) + self.layout_inexpressible(cfg)
        wanted = dict(layer_norm=True, rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False,
                      attention_out_bias=False, sliding_window=None, attention_scale=None, embedding_multiplier=1.0,
                      final_logit_softcapping=None, value_norm=False, sandwich_norms=False, moe_beside_dense=False,
                      router_norm=False, layer_scalar=False, full_attention_head_dim=None, full_attention_kv_heads=None,
                      full_attention_k_eq_v=False, attention_output_gate=False)
        problems += [f"{k}={getattr(cfg, k)!r} (dbrx has {v!r})" for k, v in wanted.items() if getattr(cfg, k) != v]
        if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
            problems.append("head_dim != hidden_size / num_attention_heads (DBRX derives it)")
        return problems

    def common_hf_config(self, cfg: MoEConfig) -> dict[str, Any]:
        return dict(
            model_type=self.model_type, architectures=[self.architecture], vocab_size=cfg.vocab_size,
            d_model=cfg.hidden_size, n_layers=cfg.num_hidden_layers, n_heads=cfg.num_attention_heads,
            max_seq_len=cfg.max_position_embeddings, tie_word_embeddings=False, bos_token_id=cfg.bos_token_id,
            eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, rope_parameters=self.rope_parameters(cfg),
            torch_dtype="float32",
        )

    def hf_config(self, cfg: MoEConfig) -> dict[str, Any]:
        return dict(
            attn_config=dict(kv_n_heads=cfg.num_key_value_heads, clip_qkv=cfg.clip_qkv, rope_theta=cfg.rope_theta),
            ffn_config=dict(ffn_hidden_size=cfg.intermediate_size, moe_num_experts=cfg.num_experts,
                            moe_top_k=cfg.num_experts_per_tok, ffn_act_fn={"name": "silu"},
                            moe_normalize_expert_weights=float(cfg.normalize_topk_p) if cfg.normalize_topk else None),
        )

    # --- tensors ---------------------------------------------------------------------------------
    def canonical_name(self, name: str) -> str:
        for old, new in _PREFIXES:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        for old, new in _RENAMES:
            name = name.replace(old, new)
        return name

    def stored_name(self, name: str) -> str:
        for old, new in _RENAMES:
            name = name.replace(new, old)
        for old, new in _PREFIXES:
            if name.startswith(new):
                return old + name[len(new):]
        return name

    def place(self, name: str, shape: tuple[int, ...], cfg: MoEConfig,
              params: dict[str, tuple[int, ...]]) -> list[Placement] | str | None:
        match = _WQKV.match(name)
        if match:  # [D + 2 G Hd, D]: q rows, k rows, v rows
            base = f"layers.{match[1]}.self_attn"
            if f"{base}.q_proj.weight" not in params:
                return None
            q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
            stored = (q + 2 * kv, cfg.hidden_size)
            return [Placement(f"{base}.q_proj.weight", transform=_rows(0, q), stored_shape=stored),
                    Placement(f"{base}.k_proj.weight", transform=_rows(q, q + kv), stored_shape=stored),
                    Placement(f"{base}.v_proj.weight", transform=_rows(q + kv, q + 2 * kv), stored_shape=stored)]
        match = _EXPERTS.match(name)
        if match:  # [E * F, D]: expert e's rows e*F..(e+1)*F, read one expert at a time
            layer, which = match[1], match[2]
            key = f"layers.{layer}.mlp.experts.{'down_proj' if which == 'w2' else 'gate_up_proj'}"
            if key not in params:
                return None
            part = {"w1": "gate", "v1": "up", "w2": None}[which]
            transform = _transposed if which == "w2" else _same
            stored = (cfg.num_experts * cfg.intermediate_size, cfg.hidden_size)
            return [Placement(key, expert=e, part=part, transform=transform, stored_shape=stored, select=e,
                              blocks=cfg.num_experts) for e in range(cfg.num_experts)]
        canon = self.canonical_name(name)
        if canon in params:
            return [Placement(canon)]
        if canon.endswith("rotary_emb.inv_freq"):
            return DERIVED
        return None

    def hf_tensors(self, model: "MoETransformer") -> Iterator[tuple[str, torch.Tensor]]:
        cfg = model.config
        state = model.state_dict()
        for name, tensor in state.items():
            if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
                continue  # fused into Wqkv with q_proj
            if name.endswith(".self_attn.q_proj.weight"):
                base = name[: -len(".q_proj.weight")]
                layer = base[len("layers."): -len(".self_attn")]
                fused = torch.cat((tensor, state[f"{base}.k_proj.weight"], state[f"{base}.v_proj.weight"]))
                yield f"transformer.blocks.{layer}.norm_attn_norm.attn.Wqkv.weight", fused  # [D + 2 G Hd, D]
                continue
            if name.endswith(".mlp.experts.gate_up_proj"):
                layer = name.split(".")[1]
                ffn = cfg.intermediate_size
                prefix = f"transformer.blocks.{layer}.ffn.experts.mlp"
                yield f"{prefix}.w1", tensor[:, :ffn].reshape(-1, cfg.hidden_size)  # [E * F, D]
                yield f"{prefix}.v1", tensor[:, ffn:].reshape(-1, cfg.hidden_size)
                continue
            if name.endswith(".mlp.experts.down_proj"):
                layer = name.split(".")[1]
                yield (f"transformer.blocks.{layer}.ffn.experts.mlp.w2",
                       tensor.transpose(1, 2).reshape(-1, cfg.hidden_size))  # [E, D, F] -> [E * F, D]
                continue
            yield self.stored_name(name), tensor

    # --- tests -----------------------------------------------------------------------------------
    def tiny_config(self, **overrides: Any):
        import transformers

        attn = {"kv_n_heads": 2, "rope_theta": 10000.0, **overrides.pop("attn_config", {})}
        ffn = {"ffn_hidden_size": 32, "moe_num_experts": 6, "moe_top_k": 2, **overrides.pop("ffn_config", {})}
        kwargs = {
            "vocab_size": 96, "d_model": 64, "n_layers": 3, "n_heads": 4, "max_seq_len": 256,
            "attn_config": attn, "ffn_config": ffn, "tie_word_embeddings": False,
            # transformers 5.x rotates with the top-level base: the same as attn_config's
            "rope_parameters": {"rope_type": "default", "rope_theta": attn["rope_theta"]},
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
            **overrides,
        }
        return transformers.DbrxConfig(attn_implementation="eager", **kwargs)
