"""Rotary position embeddings: plain RoPE and the scaled variants Hugging Face checkpoints use.

Shape legend: B batch, S tokens, Hd head dim.

A scaled RoPE is described by a *scaling dict*: ``rope_type`` (one of ``ROPE_TYPES`` other than
``"default"``) and the parameters that type reads, with transformers' defaults filled in
(``canonical_rope_scaling``). ``rope_scaling_from_hf`` reads it from a transformers
``config.json`` (``rope_parameters`` in v5, ``rope_scaling`` plus a top-level ``rope_theta`` in
v4). The inverse frequencies and the attention scaling are computed as transformers'
``modeling_rope_utils.ROPE_INIT_FUNCTIONS`` compute them (same formulas, same float32 ops, so
the results agree to the last bit or within float32 rounding); transformers is the test
reference and no runtime dependency.

- ``linear`` (``factor``): ``inv_freq / factor``.
- ``dynamic`` (``factor``): when ``L = max(position_ids) + 1`` exceeds ``M =
  max_position_embeddings``, the NTK base ``theta * (factor * L / M - (factor - 1)) ** (d / (d - 2))``,
  recomputed every forward.
- ``yarn`` (``factor``, default ``M / original_max_position_embeddings``;
  ``original_max_position_embeddings``, default ``M``; ``beta_fast`` 32; ``beta_slow`` 1;
  ``mscale`` and ``mscale_all_dim`` None; ``attention_factor``, default from factor and the
  mscales; ``truncate`` True): a ramp between interpolated and extrapolated frequencies, cos and
  sin multiplied by ``attention_factor``.
- ``llama3`` (``factor``, ``low_freq_factor``, ``high_freq_factor``,
  ``original_max_position_embeddings``, default ``M``): long wavelengths divided by ``factor``, a
  smooth blend between the two cut-offs.
- ``proportional`` (Gemma 4's full-attention layers; ``partial_rotary_factor`` p, ``factor`` 1):
  the first ``int(p * Hd // 2)`` frequencies of plain RoPE over the whole head (exponents over
  ``Hd``), the other ``Hd / 2`` frequencies zero (those dim pairs pass unrotated), all divided by
  ``factor``; unlike a partial rotary, the rotated pairs are ``(i, i + Hd/2)`` of the whole head.

- ``longrope`` as PhiMoE's rotary embedding computes it in transformers (``short_factor``,
  ``long_factor``: ``Hd / 2`` numbers each; ``short_mscale``, ``long_mscale``;
  ``original_max_position_embeddings``, default ``M``; ``factor`` and ``attention_factor`` kept for
  saving, unused): ``inv_freq = 1 / (short_factor * theta ** (2i / Hd))`` at every length, cos and
  sin times ``long_mscale`` when ``L = max(position_ids) + 1`` exceeds
  ``original_max_position_embeddings``, else ``short_mscale``. transformers' ``PhimoeRotaryEmbedding``
  recomputes its frequencies without a length on each call, so the long factor never reaches the
  angles there (transformers 5.25; checked in the tests); moetrt matches that. Generic longrope
  without the two mscales (Phi-3's, with the long factor beyond the original length) is refused.

``dynamic`` follows transformers' ``dynamic_rope_update`` on a freshly built embedding: the
base depends on the current call's ``max(position_ids) + 1`` only (a generation whose positions
grow step by step sees the same frequencies as transformers' cached update), and it is written
with tensor ops (``torch.where`` picks the plain or the NTK frequencies), so it exports to ONNX
with dynamic shapes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from moetrt.errors import UnsupportedModelError

__all__ = [
    "ROPE_TYPES", "RotaryEmbedding", "canonical_rope_scaling", "rope_scaling_from_hf", "partial_rotary_factor", "yarn_mscale",
]

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "proportional", "longrope")

_REQUIRED = object()

# the parameters each scaled type reads, with transformers' defaults; None: derived in
# canonical_rope_scaling (from max_position_embeddings or from the other parameters)
_PARAMETERS: dict[str, dict[str, Any]] = {
    "linear": {"factor": _REQUIRED},
    "proportional": {"factor": 1.0},
    "dynamic": {"factor": _REQUIRED},
    "yarn": {
        "factor": None,
        "original_max_position_embeddings": None,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": None,
        "mscale_all_dim": None,
        "attention_factor": None,
        "truncate": True,
    },
    "llama3": {
        "factor": _REQUIRED,
        "low_freq_factor": _REQUIRED,
        "high_freq_factor": _REQUIRED,
        "original_max_position_embeddings": None,
    },
    "longrope": {
        "short_factor": _REQUIRED,
        "long_factor": _REQUIRED,
        "original_max_position_embeddings": None,
        "factor": None,
        "attention_factor": None,
        "short_mscale": None,
        "long_mscale": None,
    },
}

# keys a RoPE description may carry besides the scaling parameters: the type (``type`` is
# transformers v4's name for it), the base (passed to RotaryEmbedding separately) and a
# partial_rotary_factor of 1.0 (the whole head rotates, which is what RotaryEmbedding does)
_NON_SCALING_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor")


def _rope_type(scaling: dict[str, Any]) -> str:
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if "rope_type" in scaling and "type" in scaling and scaling["type"] != scaling["rope_type"]:
        raise ValueError(
            f"RoPE scaling names two types, rope_type={scaling['rope_type']!r} and type={scaling['type']!r}; "
            "keep one of them"
        )
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(
            f"RoPE type {rope_type!r} is not supported; supported types: {', '.join(ROPE_TYPES)}"
        )
    return rope_type


def _number(rope_type: str, name: str, value: Any, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"RoPE {rope_type} parameter {name!r} must be a finite number, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"RoPE {rope_type} parameter {name!r} must be > 0, got {value!r}")
    return float(value)


def _positions(rope_type: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"RoPE {rope_type} parameter {name!r} must be a positive int, got {value!r}")
    return value


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    # transformers' get_mscale (YaRN paper, DeepSeek's variant with an mscale multiplier)
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


yarn_mscale = _yarn_mscale  # DeepSeek's attention scale reads it too (moetrt.model.latent_softmax_scale)


def canonical_rope_scaling(
    scaling: dict[str, Any] | None, max_position_embeddings: int | None = None
) -> dict[str, Any] | None:
    """The canonical scaling dict of ``scaling``, or None for plain RoPE.

    ``scaling`` is a ``rope_parameters`` / ``rope_scaling`` style dict. The result holds
    ``rope_type`` and every parameter that type reads (see the module table), defaults filled in
    as transformers fills them; ``max_position_embeddings`` is the model's, read where a default
    derives from it. A type outside ``ROPE_TYPES`` or a parameter the type does not read raises
    ``UnsupportedModelError``; a bad value raises ``ValueError`` naming the parameter.
    """
    if not scaling:
        return None
    rope_type = _rope_type(scaling)
    known = _PARAMETERS.get(rope_type, {})
    prf = scaling.get("partial_rotary_factor", 1.0)
    if rope_type == "proportional":  # the factor is part of this type's frequencies, not a partial rotary
        if not 0.0 < float(prf) <= 1.0:
            raise ValueError(f"RoPE proportional parameter 'partial_rotary_factor' must be in (0, 1], got {prf!r}")
    elif prf != 1.0:
        raise UnsupportedModelError(
            f"RoPE partial_rotary_factor={prf!r} is not supported (only 1.0: RoPE over the whole head)"
        )
    unknown = sorted(set(scaling) - set(known) - set(_NON_SCALING_KEYS))
    if unknown:
        raise UnsupportedModelError(
            f"RoPE {rope_type} parameter(s) {unknown} are not supported; {rope_type} reads "
            f"{sorted(known) or 'no parameters'}"
        )
    if rope_type == "default":
        return None

    missing = sorted(k for k, d in known.items() if d is _REQUIRED and scaling.get(k) is None)
    if missing:
        raise ValueError(f"RoPE {rope_type} needs parameter(s) {missing}; add them to the RoPE scaling dict")
    out: dict[str, Any] = {"rope_type": rope_type}
    out["factor"] = None if scaling.get("factor") is None else _number(rope_type, "factor", scaling["factor"])
    if rope_type == "proportional":
        out["factor"] = _number(rope_type, "factor", scaling.get("factor", 1.0))
        out["partial_rotary_factor"] = float(prf)
        return out

    if rope_type == "longrope":
        _canonical_longrope(scaling, out)
    if "original_max_position_embeddings" in known:
        orig = scaling.get("original_max_position_embeddings")
        if orig is None:  # transformers' standardize_rope_params: the model's max_position_embeddings
            if max_position_embeddings is None:
                raise ValueError(
                    f"RoPE {rope_type} needs original_max_position_embeddings (or the model's "
                    "max_position_embeddings to default it to)"
                )
            orig = max_position_embeddings
        out["original_max_position_embeddings"] = _positions(rope_type, "original_max_position_embeddings", orig)

    if rope_type == "llama3":
        low = _number(rope_type, "low_freq_factor", scaling["low_freq_factor"])
        high = _number(rope_type, "high_freq_factor", scaling["high_freq_factor"])
        if low == high:
            raise ValueError(f"RoPE llama3 low_freq_factor and high_freq_factor must differ, both are {low!r}")
        out.update(low_freq_factor=low, high_freq_factor=high)
    elif rope_type == "yarn":
        orig = out["original_max_position_embeddings"]
        if out["factor"] is None:  # DeepSeek-V3 style: the ratio of the post- and pre-YaRN lengths
            if max_position_embeddings is None:
                raise ValueError("RoPE yarn needs factor (or the model's max_position_embeddings to derive it)")
            out["factor"] = max_position_embeddings / orig
        factor = out["factor"]
        # transformers reads `get("beta_fast") or 32`: a 0 or None means the default
        out["beta_fast"] = _number(rope_type, "beta_fast", scaling.get("beta_fast") or 32, positive=False)
        out["beta_slow"] = _number(rope_type, "beta_slow", scaling.get("beta_slow") or 1, positive=False)
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        for name, value in (("mscale", mscale), ("mscale_all_dim", mscale_all_dim)):
            if value is not None:
                _number(rope_type, name, value, positive=False)
        out["mscale"] = None if mscale is None else float(mscale)
        out["mscale_all_dim"] = None if mscale_all_dim is None else float(mscale_all_dim)
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            if mscale and mscale_all_dim:
                attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
            else:
                attention_factor = _yarn_mscale(factor)
        out["attention_factor"] = _number(rope_type, "attention_factor", attention_factor)
        truncate = scaling.get("truncate", True)
        if not isinstance(truncate, bool):
            raise ValueError(f"RoPE yarn parameter 'truncate' must be true or false, got {truncate!r}")
        out["truncate"] = truncate
    return out


def _canonical_longrope(scaling: dict[str, Any], out: dict[str, Any]) -> None:
    """The longrope parameters of ``scaling`` into ``out`` (PhiMoE's form: both mscales given)."""
    if scaling.get("short_mscale") is None or scaling.get("long_mscale") is None:
        raise UnsupportedModelError(
            "RoPE longrope without short_mscale and long_mscale (transformers' generic longrope, Phi-3's: the long "
            "factor beyond original_max_position_embeddings) is not supported; moetrt implements PhiMoE's longrope")
    for name in ("short_factor", "long_factor"):
        value = scaling[name]
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError(f"RoPE longrope parameter {name!r} must be a list of numbers, got {value!r}")
        out[name] = [_number("longrope", name, v) for v in value]
    for name in ("short_mscale", "long_mscale"):
        out[name] = _number("longrope", name, scaling[name])
    attention_factor = scaling.get("attention_factor")
    out["attention_factor"] = None if attention_factor is None else _number("longrope", "attention_factor",
                                                                             attention_factor)


def rope_scaling_from_hf(hf: dict[str, Any]) -> dict[str, Any] | None:
    """The canonical RoPE scaling dict a transformers ``config.json`` describes, or None for plain RoPE.

    Reads ``rope_scaling`` (transformers v4) or else ``rope_parameters`` (v5), as transformers
    does (``rope_scaling`` wins when both are set); a top-level ``original_max_position_embeddings``
    (Phi-3 style) takes precedence over the one inside, as in transformers. Raises
    ``UnsupportedModelError`` for a type outside ``ROPE_TYPES`` or a parameter moetrt does not
    implement.
    """
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ValueError(f"config.json rope_scaling/rope_parameters must be an object, got {params!r}")
    if set(params) & set(hf.get("layer_types") or ()):
        raise UnsupportedModelError(
            f"RoPE parameters per layer type ({sorted(params)}) are not supported; "
            "moetrt applies one RoPE to all layers"
        )
    params = {k: v for k, v in params.items() if k != "partial_rotary_factor"}  # read by partial_rotary_factor()
    max_pos = hf.get("max_position_embeddings")
    top_level_original = hf.get("original_max_position_embeddings")
    if params and _rope_type(params) in ("yarn", "llama3", "longrope") and top_level_original is not None:
        params["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
    return canonical_rope_scaling(params, max_pos)


def partial_rotary_factor(hf: dict[str, Any]) -> float:
    """The share of each head RoPE rotates, as a transformers ``config.json`` says it (1.0: the whole head).

    Read from ``rope_parameters`` / ``rope_scaling`` (v5), a top-level ``partial_rotary_factor``
    (v4: GLM-4.5), or MiniMax-M2's ``rotary_dim`` over ``head_dim``.
    """
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    factor = params.get("partial_rotary_factor") if isinstance(params, dict) else None
    if factor is None:
        factor = hf.get("partial_rotary_factor")
    if factor is None and hf.get("rotary_dim") and hf.get("head_dim"):
        factor = hf["rotary_dim"] / hf["head_dim"]
    factor = 1.0 if factor is None else float(factor)
    if not 0.0 < factor <= 1.0:
        raise ValueError(f"config.json partial_rotary_factor must be in (0, 1], got {factor!r}")
    return factor


def _default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    # the arange is int64 cast to float, as in transformers' scaled init functions
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim))


def _yarn_inv_freq(head_dim: int, theta: float, s: dict[str, Any]) -> torch.Tensor:
    # transformers' _compute_yarn_parameters, op for op
    dim, factor = head_dim, s["factor"]

    def correction_dim(num_rotations: float) -> float:
        # the dimension index at which a wavelength makes num_rotations turns in the original length
        return (dim * math.log(s["original_max_position_embeddings"] / (num_rotations * 2 * math.pi))) / (
            2 * math.log(theta)
        )

    low, high = correction_dim(s["beta_fast"]), correction_dim(s["beta_slow"])
    if s["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # prevent a division by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)  # [Hd/2]

    pos_freqs = theta ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    extrapolation = 1 - ramp
    return inv_freq_interpolation * (1 - extrapolation) + inv_freq_extrapolation * extrapolation


def _llama3_inv_freq(head_dim: int, theta: float, s: dict[str, Any]) -> torch.Tensor:
    # transformers' _compute_llama3_parameters, op for op
    inv_freq = _default_inv_freq(head_dim, theta)
    factor, low_ff, high_ff = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context_len = s["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_ff
    high_freq_wavelen = old_context_len / high_ff
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def rope_init(head_dim: int, theta: float, scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """``(inv_freq [Hd/2], attention_scaling)`` of a canonical scaling dict at the original length."""
    rope_type = scaling["rope_type"]
    if rope_type == "linear":
        inv_freq = _default_inv_freq(head_dim, theta)
        inv_freq /= scaling["factor"]
        return inv_freq, 1.0
    if rope_type == "dynamic":  # seq_len <= max_position_embeddings: the plain frequencies
        return _default_inv_freq(head_dim, theta), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling), scaling["attention_factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(head_dim, theta, scaling), 1.0
    if rope_type == "proportional":  # transformers' _compute_proportional_rope_parameters, op for op
        angles = int(scaling["partial_rotary_factor"] * head_dim // 2)
        rotated = 1.0 / (theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim))
        inv_freq = torch.cat((rotated, torch.zeros(head_dim // 2 - angles, dtype=torch.float32)))  # [Hd/2]
        return inv_freq / scaling["factor"], 1.0
    if rope_type == "longrope":  # transformers' _compute_longrope_parameters without a length: the short factor
        factors = torch.tensor(scaling["short_factor"], dtype=torch.float32)
        if factors.numel() != head_dim // 2:
            raise ValueError(f"RoPE longrope short_factor has {factors.numel()} numbers, the head needs {head_dim // 2} "
                             "(head_dim / 2)")
        if len(scaling["long_factor"]) != head_dim // 2:
            raise ValueError(f"RoPE longrope long_factor has {len(scaling['long_factor'])} numbers, the head needs "
                             f"{head_dim // 2} (head_dim / 2)")
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (factors * theta**exponent), scaling["short_mscale"]
    raise AssertionError(f"unhandled canonical rope_type {rope_type!r}")


class RotaryEmbedding(nn.Module):
    """cos and sin of the rotary angles ``position * inv_freq``, frequencies concatenated twice (rotate-half layout).

    ``scaling`` is a RoPE scaling dict (``canonical_rope_scaling``; None or ``rope_type
    "default"``: plain RoPE); ``max_position_embeddings`` is the model's, needed by ``dynamic``
    and where a default derives from it.
    """

    def __init__(
        self,
        head_dim: int,
        theta: float,
        scaling: dict[str, Any] | None = None,
        max_position_embeddings: int | None = None,
    ):
        super().__init__()
        if scaling and "rope_theta" in scaling and float(scaling["rope_theta"]) != float(theta):
            raise ValueError(
                f"RoPE scaling rope_theta={scaling['rope_theta']!r} differs from theta={theta!r}; pass one base"
            )
        self.scaling = canonical_rope_scaling(scaling, max_position_embeddings)
        self.attention_scaling = 1.0
        if self.scaling is None:
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        else:
            inv_freq, self.attention_scaling = rope_init(head_dim, theta, self.scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [Hd/2]
        self._dynamic = self.scaling is not None and self.scaling["rope_type"] == "dynamic"
        # PhiMoE's longrope: cos and sin times long_mscale past original_max_position_embeddings, else short_mscale
        self._longrope = self.scaling is not None and self.scaling["rope_type"] == "longrope"
        if self._dynamic:
            if max_position_embeddings is None:
                raise ValueError("RoPE dynamic needs max_position_embeddings (the length beyond which it rescales)")
            self.head_dim, self.theta, self.max_position_embeddings = head_dim, float(theta), max_position_embeddings

    def _dynamic_inv_freq(self, position_ids: torch.Tensor) -> torch.Tensor:
        # transformers' dynamic_rope_update + _compute_dynamic_ntk_parameters with a tensor seq_len
        dim, factor, max_pos = self.head_dim, self.scaling["factor"], self.max_position_embeddings
        seq_len = position_ids.max() + 1  # [] int
        grown = torch.clamp(seq_len, min=max_pos)
        base = self.theta * ((factor * grown / max_pos) - (factor - 1)) ** (dim / (dim - 2))  # []
        # made here, not held in a buffer, so it stays float32 when the module is cast to fp16/bf16
        exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=position_ids.device).to(torch.float) / dim
        ntk_inv_freq = 1.0 / (base**exponent)  # [Hd/2]
        return torch.where(seq_len > max_pos, ntk_inv_freq, self.inv_freq)

    def _longrope_mscale(self, position_ids: torch.Tensor) -> torch.Tensor:
        # transformers' PhimoeRotaryEmbedding: the length of this call decides, max(position_ids) + 1
        long = (position_ids.max() + 1) > self.scaling["original_max_position_embeddings"]  # [] bool
        # Python scalars, not tensors: the export writes them as constants (a tensor made here would be lifted to
        # an initializer that no model parameter or config value names)
        return torch.where(long, self.scaling["long_mscale"], self.scaling["short_mscale"])  # [] float32

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self._dynamic_inv_freq(position_ids) if self._dynamic else self.inv_freq
        freqs = position_ids[:, :, None].float() * inv_freq  # [B, S, Hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, Hd]
        if self._longrope:
            mscale = self._longrope_mscale(position_ids)
            return (emb.cos() * mscale).to(dtype), (emb.sin() * mscale).to(dtype)
        if self.attention_scaling == 1.0:
            return emb.cos().to(dtype), emb.sin().to(dtype)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)
