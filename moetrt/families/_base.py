"""What every model family module fills in, and the parts most families share.

A family translates between one Hugging Face ``model_type`` and moetrt:

- ``config_from_hf(hf)``: transformers' ``config.json`` dict -> :class:`MoEConfig`, refusing
  (``UnsupportedModelError``, with the reason) what moetrt cannot compute;
- ``place(name, shape)``: where one checkpoint tensor goes in the model (:class:`Placement`), with
  its transform (split into gate/up rows, transpose, de-interleave, dequantize);
- ``inexpressible(cfg)`` / ``hf_config(cfg)`` / ``hf_tensors(model)``: the reverse, for
  ``save_pretrained``;
- ``tiny_config(...)``: a small config on transformers' own config class with every feature of the
  family turned on, for the tests (transformers' modeling code is the parity reference).

Nothing outside ``moetrt/families`` branches on ``model_type``.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from moetrt.config import MoEConfig
from moetrt.errors import CheckpointError, UnsupportedModelError

if TYPE_CHECKING:
    from moetrt.model import MoETransformer

__all__ = ["Family", "ImageTextFamily", "Placement", "field", "rope", "rope_theta", "DERIVED", "COMPANION", "SKIPPED"]


@dataclass(frozen=True)
class Placement:
    """Where (part of) one checkpoint tensor goes.

    ``key``: the model parameter. ``expert``: one expert of a stacked ``[E, ...]`` parameter (None:
    the whole parameter). ``part``: ``"gate"`` or ``"up"`` rows of that expert's ``[2F, D]`` slice
    (None: all of it). ``transform`` maps the stored tensor (``[select]`` of it, when ``select`` is
    set: one expert of a stacked checkpoint tensor) to the destination's values; ``stored_shape`` is
    then the shape the stored tensor must have. ``needs`` names companion checkpoint tensors the
    transform also reads (MXFP4 scales beside their blocks): ``transform(tensor, *companions)``.
    ``blocks``: with ``select``, the stored tensor's first axis holds that many equal blocks, one per
    expert (DBRX's ``[E * F, D]``), and ``select`` picks one block rather than one row.
    """

    key: str
    expert: int | None = None
    part: str | None = None
    transform: Callable[..., torch.Tensor] | None = None
    stored_shape: tuple[int, ...] | None = None
    select: int | None = None
    needs: tuple[str, ...] = ()
    blocks: int | None = None


# a buffer recomputed from the config (rotary inv_freq), ignored with a warning
DERIVED = "derived"
# a tensor that only another tensor's transform reads (MXFP4 scales beside their blocks)
COMPANION = "companion"
# a tensor transformers does not load either (DeepSeek's multi-token-prediction layers), skipped with a
# warning that gives the family's skipped_reason
SKIPPED = "skipped"

# one projection of one expert, as Mixtral/Qwen/OLMoE checkpoints store them on disk
_PER_EXPERT = re.compile(
    r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
# either naming is read for any of these families (Mixtral's w1/w3/w2, the others' *_proj)
_PART = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_DERIVED = re.compile(r"rotary_emb\.inv_freq$|\.rotary_emb\.original_inv_freq$")


def field(hf: dict[str, Any], *names: str) -> Any:
    """The first of ``names`` present in config.json (families alias some fields)."""
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    raise CheckpointError(
        f"config.json of this {hf.get('model_type')} checkpoint lacks the field {' / '.join(names)}; "
        "the config is incomplete, re-download it or add the field"
    )


def rope(hf: dict[str, Any], default_theta: float, partial: bool = False, longrope: bool = False) -> dict[str, Any]:
    """``rope_theta`` and ``rope_scaling`` of a config.json (v5 ``rope_parameters`` or v4 ``rope_scaling``).

    A scaled RoPE of a type moetrt does not implement raises ``UnsupportedModelError`` naming it
    (:func:`moetrt.rope.rope_scaling_from_hf`); it is never silently dropped. With ``partial`` (a
    family whose transformers code rotates part of each head), a ``partial_rotary_factor`` below 1
    becomes ``rotary_dim``; other families refuse it. ``longrope``: the family's transformers code
    computes PhiMoE's longrope (``moetrt.rope``); every other family's would compute transformers'
    generic one, which moetrt does not implement, so they refuse the type by name.
    """
    from moetrt.rope import ROPE_TYPES, partial_rotary_factor, rope_scaling_from_hf

    raw = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not longrope and "longrope" in (raw.get("rope_type"), raw.get("type")):
        supported = ", ".join(t for t in ROPE_TYPES if t not in ("default", "longrope"))
        raise UnsupportedModelError(
            f"RoPE type 'longrope' is not supported for {hf.get('model_type')} (moetrt implements PhiMoE's longrope, "
            f"for phimoe only); supported types: {supported}"
        )
    params = hf.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", default_theta)))
    out = dict(rope_theta=theta, rope_scaling=rope_scaling_from_hf(hf))
    factor = partial_rotary_factor(hf)
    if factor != 1.0:
        if not partial:
            raise UnsupportedModelError(
                f"RoPE partial_rotary_factor={factor!r} is not supported for {hf.get('model_type')} "
                "(only 1.0: RoPE over the whole head)"
            )
        head_dim = hf.get("head_dim") or field(hf, "hidden_size") // field(hf, "num_attention_heads")
        out["rotary_dim"] = int(head_dim * factor)  # transformers' int(head_dim * partial_rotary_factor)
    return out


def rope_theta(hf: dict[str, Any], default: float) -> float:
    """Only ``rope_theta``, for families whose configs carry no RoPE scaling."""
    return rope(hf, default)["rope_theta"]


class Family(ABC):
    """One Hugging Face model family. Subclass, fill in the class attributes, override what differs."""

    model_type: ClassVar[str]
    architecture: ClassVar[str]  # transformers' CausalLM class name, written to config.json
    hf_config_class: ClassVar[str]  # transformers' config class, for tiny_config
    # names of one expert's projections on disk: {"w1": "gate", "w3": "up", "w2": "down"}
    expert_names: ClassVar[dict[str, str]] = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
    default_rms_norm_eps: ClassVar[float] = 1e-5
    # what every config.json of the family has (inexpressible otherwise)
    family_qk_norm: ClassVar[str | None] = None
    all_layers_moe: ClassVar[bool] = True  # no dense layers among the MoE ones
    # MoEConfig options beyond the Mixtral/Qwen/OLMoE set that the family's config.json says
    expresses: ClassVar[frozenset[str]] = frozenset()
    # why place() skips some tensors (SKIPPED), said in the warning
    skipped_reason: ClassVar[str] = ""
    # the tiny configs the tests build (variant name -> overrides of tiny_config's defaults)
    tiny_variants: ClassVar[dict[str, dict[str, Any]]] = {}

    # --- config.json -> MoEConfig --------------------------------------------------------------
    @abstractmethod
    def config_from_hf(self, hf: dict[str, Any]) -> MoEConfig:
        ...

    def text_config(self, hf: dict[str, Any]) -> dict[str, Any]:
        """The text model's fields of config.json: all of it (:class:`ImageTextFamily`: its ``text_config``)."""
        return hf

    def refuse_quantized(self, hf: dict[str, Any]) -> None:
        """Refuse a checkpoint whose config.json (or its ``text_config``) names a quantization moetrt does not read."""
        quant = hf.get("quantization_config") or self.text_config(hf).get("quantization_config")
        if quant:
            raise UnsupportedModelError(f"{self.model_type} checkpoints quantized with {quant.get('quant_method')!r} "
                                        "are not supported; use a bf16 checkpoint")

    def common_config(self, hf: dict[str, Any], num_experts: Any) -> dict[str, Any]:
        """The fields every family reads the same way."""
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported (experts must be SwiGLU: 'silu')")
        heads = field(hf, "num_attention_heads")
        return dict(
            vocab_size=field(hf, "vocab_size"),
            hidden_size=field(hf, "hidden_size"),
            num_hidden_layers=field(hf, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim"),
            num_experts=num_experts,
            num_experts_per_tok=field(hf, "num_experts_per_tok"),
            rms_norm_eps=hf.get("rms_norm_eps", self.default_rms_norm_eps),  # transformers' default
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            model_type=self.model_type,
        )

    # --- MoEConfig -> config.json --------------------------------------------------------------
    @abstractmethod
    def inexpressible(self, cfg: MoEConfig) -> list[str]:
        """What of ``cfg`` this family's config.json cannot say (saving it would write another model)."""
        ...

    def common_inexpressible(self, cfg: MoEConfig) -> list[str]:
        problems = []
        if "scoring" not in self.expresses and (cfg.scoring != "softmax" or cfg.routed_scaling_factor != 1.0):
            problems.append("sigmoid scoring or routed_scaling_factor != 1")
        defaults = MoEConfig.__dataclass_fields__
        for name in ("activation", "expert_bias", "router_bias", "attention_sinks", "layer_types", "selection_bias",
                     "n_group", "kv_lora_rank", "rotary_dim", "norm_min", "mlp_bias", "lm_head_bias",
                     "residual_multiplier", "logits_scaling", "normalize_topk_p", "layer_norm",
                     "layer_norm_bias"):
            if name == "rotary_dim" and cfg.latent_attention:
                continue  # derived from qk_rope_head_dim (kv_lora_rank says the rest)
            if name not in self.expresses and getattr(cfg, name) != defaults[name].default:
                problems.append(f"{name}={getattr(cfg, name)!r} (the family has {defaults[name].default!r})")
        return problems

    def layout_inexpressible(self, cfg: MoEConfig) -> list[str]:
        """q/k norm, shared experts and dense layers the family's config.json cannot say."""
        problems = []
        if cfg.qk_norm != self.family_qk_norm:
            problems.append(f"qk_norm={cfg.qk_norm!r} (the family has {self.family_qk_norm!r})")
        problems += self.shared_expert_problems(cfg)
        if self.all_layers_moe and cfg.moe_layers != list(range(cfg.num_hidden_layers)):
            problems.append("dense layers among MoE layers")
        return problems

    def shared_expert_problems(self, cfg: MoEConfig) -> list[str]:
        return ["a shared expert"] if cfg.shared_expert_intermediate_size else []

    @abstractmethod
    def hf_config(self, cfg: MoEConfig) -> dict[str, Any]:
        """The family's own fields of config.json (the common ones come from :meth:`common_hf_config`)."""
        ...

    def common_hf_config(self, cfg: MoEConfig) -> dict[str, Any]:
        return dict(
            model_type=self.model_type, architectures=[self.architecture], vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim, hidden_act="silu", num_experts_per_tok=cfg.num_experts_per_tok,
            rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
            eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
            rope_theta=cfg.rope_theta, rope_parameters=self.rope_parameters(cfg), torch_dtype="float32",
        )

    @staticmethod
    def rope_parameters(cfg: MoEConfig) -> dict[str, Any]:
        """transformers v5's ``rope_parameters`` for ``cfg``."""
        if cfg.rope_scaling is None:
            return {"rope_type": "default", "rope_theta": cfg.rope_theta}
        params = {k: v for k, v in cfg.rope_scaling.items() if v is not None}
        return {**params, "rope_theta": cfg.rope_theta}

    # --- checkpoint tensors -> parameters ------------------------------------------------------
    def canonical_name(self, name: str) -> str:
        """A checkpoint tensor's name as the model's parameter would be named (before the family's renames)."""
        return name[len("model."):] if name.startswith("model.") else name

    def place(self, name: str, shape: tuple[int, ...], cfg: MoEConfig,
              params: dict[str, tuple[int, ...]]) -> list[Placement] | str | None:
        """Where checkpoint tensor ``name`` goes: placements, :data:`DERIVED`, or None (no place).

        ``params``: the model's parameter names and shapes. The default reads one tensor per
        expert projection (``layers.{i}.mlp.experts.{e}.{gate|up|down}``), the transformers v5
        stacked layout (``experts.gate_up_proj`` ``[E, 2F, D]``) and every other parameter by name.
        """
        canon = self.canonical_name(name)
        match = _PER_EXPERT.match(canon)
        if match:
            layer, expert, part = int(match[1]), int(match[2]), _PART[match[3]]
            base = f"layers.{layer}.mlp.experts"
            key = f"{base}.down_proj" if part == "down" else f"{base}.gate_up_proj"
            if key not in params or expert >= cfg.num_experts:
                return None
            return [Placement(key, expert, None if part == "down" else part)]
        if canon in params:
            return [Placement(canon)]
        if _DERIVED.search(canon):
            return DERIVED
        return None

    # --- parameters -> checkpoint tensors ------------------------------------------------------
    @staticmethod
    def saved_tensors(model: "MoETransformer") -> Iterator[tuple[str, str, torch.Tensor]]:
        """``(prefix, name, tensor)`` of each tensor a checkpoint stores: ``"model."`` but for ``lm_head``, which
        tied embeddings leave out."""
        for name, tensor in model.state_dict().items():
            if model.config.tie_word_embeddings and name == "lm_head.weight":
                continue
            yield "" if name == "lm_head.weight" else "model.", name, tensor

    def hf_tensors(self, model: "MoETransformer") -> Iterator[tuple[str, torch.Tensor]]:
        """The model's tensors under the family's on-disk names (one tensor per expert projection)."""
        cfg = model.config
        names = {part: stored for stored, part in self.expert_names.items()}
        ffn = cfg.intermediate_size
        for prefix, name, tensor in self.saved_tensors(model):
            if name.endswith(".experts.gate_up_proj") or name.endswith(".experts.down_proj"):
                base = self.stored_name(name.rsplit(".", 1)[0])
                for e in range(cfg.num_experts):
                    if name.endswith("down_proj"):
                        yield f"model.{base}.{e}.{names['down']}.weight", tensor[e]
                    else:
                        yield f"model.{base}.{e}.{names['gate']}.weight", tensor[e, :ffn]
                        yield f"model.{base}.{e}.{names['up']}.weight", tensor[e, ffn:]
                continue
            yield prefix + self.stored_name(name), tensor

    def stored_name(self, name: str) -> str:
        """A parameter's name as the family stores it (the inverse of the renames in canonical_name)."""
        return name

    # --- tests -----------------------------------------------------------------------------------
    def tiny_config(self, **overrides: Any):
        """A small transformers config of this family (eager attention), ``overrides`` on top."""
        import transformers

        kwargs = {
            "vocab_size": 96, "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_experts_per_tok": 2, "max_position_embeddings": 256,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
            **overrides,
        }
        return getattr(transformers, self.hf_config_class)(attn_implementation="eager", **kwargs)


class ImageTextFamily:
    """Mixin for the image-text checkpoint of a text family (``class Gemma4(ImageTextFamily, Gemma4Text)``): the
    text model's fields come from ``text_config``, and the model saves as the text model it is."""

    text_family: ClassVar[type[Family]]  # the text model's family

    def text_config(self, hf: dict[str, Any]) -> dict[str, Any]:
        text = hf.get("text_config")
        if not isinstance(text, dict):
            raise CheckpointError(
                f"config.json of this {self.model_type} checkpoint has no text_config; re-download the config")
        return text

    def common_hf_config(self, cfg: MoEConfig) -> dict[str, Any]:
        # saved as the text model (its causal LM, tensors under "model.")
        return {**super().common_hf_config(cfg), "model_type": self.text_family.model_type,
                "architectures": [self.text_family.architecture]}
