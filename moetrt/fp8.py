"""FP8 block-quantized weights (DeepSeek-V3, Kimi-K2, GLM-4.5-FP8): dequantize, quantize, read checkpoints.

Such checkpoints say in config.json ``"quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
"activation_scheme": "dynamic", "weight_block_size": [bn, bk]}`` and store most Linear weights as

- ``X.weight`` float8_e4m3fn ``[..., N, K]`` (``N`` output rows, ``K`` input columns), and beside it
- ``X.weight_scale_inv`` float32 ``[..., ceil(N / bn), ceil(K / bk)]``: one scale per ``bn x bk``
  block; the blocks on the bottom and right edges are partial when ``bn`` / ``bk`` do not divide
  ``N`` / ``K`` (DeepSeek-V3's ``kv_a_proj_with_mqa``, 576 rows in blocks of 128).

The real weight is ``w[..., n, k] = float32(q[..., n, k]) * scale_inv[..., n // bn, k // bk]``.
Embeddings, norms, ``lm_head``, routers (``mlp.gate.weight``, ``e_score_correction_bias``) stay
unquantized. transformers' stacked expert parameters use ``X`` + ``X_scale_inv``
(``experts.gate_up_proj_scale_inv``); :func:`scale_name` gives either.

moetrt dequantizes every FP8 weight on the way in, one tensor at a time (the streaming export
too), and records in the model's ``MoEConfig.extra["source_quantization"]`` (so in
``moetrt.json``) that the source was FP8 e4m3 in blocks ``[bn, bk]`` and how many tensors were.
A GPU path can later take the FP8 bytes and their block scales as they are (an FP8 GEMM with
per-block scales, as DeepGEMM or transformers' Triton kernel does) instead of the dequantized
values: the record says which format the bytes are in.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from moetrt.errors import CheckpointError, UnsupportedModelError

if TYPE_CHECKING:
    from moetrt.families import Placement

__all__ = [
    "FP8_DTYPE", "FP8_MAX", "DEFAULT_BLOCK", "FLOAT8_DTYPES", "FP8Scheme", "dequantize_fp8_blocks", "quantize_fp8_blocks",
    "scale_name", "is_scale_name", "scale_shape",
]

#: the element type of the stored weights (e4m3 without infinities: max 448, NaN 0x7F / 0xFF)
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
#: transformers' default ``weight_block_size`` (DeepSeek-V3's)
DEFAULT_BLOCK = (128, 128)
# float8 element types a checkpoint may hold; only e4m3 is read
FLOAT8_DTYPES = frozenset(
    getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz") if hasattr(torch, n)
)


def _check_block(block: Any) -> tuple[int, int]:
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ValueError(f"FP8 block must be two positive ints [rows, cols], got {block!r}")
    return int(block[0]), int(block[1])


def scale_shape(shape: tuple[int, ...], block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, ...]:
    """The ``weight_scale_inv`` shape of a weight of ``shape`` ``[..., N, K]``: ``[..., ceil(N/bn), ceil(K/bk)]``."""
    bn, bk = _check_block(block)
    if len(shape) < 2:
        raise ValueError(f"an FP8 block-quantized weight has at least 2 dims [..., N, K], got shape {list(shape)}")
    *lead, n, k = shape
    return (*lead, math.ceil(n / bn), math.ceil(k / bk))


def scale_name(weight_name: str) -> str:
    """The name of the scale stored beside ``weight_name`` (``X.weight`` -> ``X.weight_scale_inv``, ``X`` -> ``X_scale_inv``).

    transformers' rule (``Fp8Quantize``): ``X.weight`` of a Linear, ``X_scale_inv`` of a stacked
    experts parameter such as ``experts.gate_up_proj``.
    """
    if weight_name.endswith(".weight"):
        return weight_name[: -len("weight")] + "weight_scale_inv"
    return weight_name + "_scale_inv"


def is_scale_name(name: str) -> bool:
    """Whether ``name`` is an FP8 block scale (``*.weight_scale_inv`` or a stacked ``*_scale_inv``)."""
    return name.endswith("_scale_inv")


def dequantize_fp8_blocks(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The ``[..., N, K]`` values in ``dtype`` of FP8 ``weight`` and its per-block ``scale_inv``.

    ``weight`` float8_e4m3fn ``[..., N, K]``; ``scale_inv`` floating point ``[..., ceil(N/bn),
    ceil(K/bk)]`` (float32 in the checkpoints); ``block`` ``(bn, bk)``, config.json's
    ``weight_block_size``. Element ``[n, k]`` is ``float32(weight) * float32(scale_inv[n // bn, k // bk])``,
    one float32 multiply rounded to nearest even, then converted to ``dtype``. That is bit for bit
    what transformers computes: ``Fp8Dequantize._dequantize_one`` (``dequantize=True`` loading:
    ``(q.float() * s.float()).to(dtype)``), and ``_dequantize_fp8_weight`` in float32, which also
    handles partial edge blocks the same way (the last row/column block covers what is left).
    transformers' load-time ``Fp8Dequantize`` derives the block from ``N // scale_rows`` and so
    cannot read partial blocks (it refuses them, or with a grid that divides by chance, uses the
    wrong block); moetrt takes the block from config.json and reads them exactly.

    Raises ``CheckpointError`` for tensors that are not FP8 e4m3 block-quantized (dtypes, a scale
    whose shape does not match the blocks), ``ValueError`` for a bad ``block`` or ``dtype``.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dequantize_fp8_blocks dtype must be a floating-point torch.dtype, got {dtype!r}")
    bn, bk = _check_block(block)
    if not isinstance(weight, torch.Tensor) or weight.dtype != FP8_DTYPE:
        got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise CheckpointError(f"FP8 weight must be a {FP8_DTYPE} tensor, got {got}")
    if (not isinstance(scale_inv, torch.Tensor) or not scale_inv.dtype.is_floating_point
            or scale_inv.dtype in FLOAT8_DTYPES):
        got = scale_inv.dtype if isinstance(scale_inv, torch.Tensor) else type(scale_inv).__name__
        raise CheckpointError(f"FP8 weight_scale_inv must be a float32 tensor (one scale per block), got {got}")
    if weight.dim() < 2:
        raise CheckpointError(f"FP8 weight must have shape [..., N, K], got {list(weight.shape)}")
    expected = scale_shape(tuple(weight.shape), (bn, bk))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(
            f"FP8 weight_scale_inv shape {list(scale_inv.shape)} does not match weight shape {list(weight.shape)} in "
            f"blocks of {[bn, bk]}: expected {list(expected)} ([..., ceil(N/{bn}), ceil(K/{bk})]); "
            "quantization_config.weight_block_size and the weights disagree"
        )
    rows, cols = weight.shape[-2:]
    out = weight.to(torch.float32)  # [..., N, K], exact
    # each scale repeated over its block's rows only, cut to N (partial last block); columns broadcast
    scale = scale_inv.to(torch.float32).repeat_interleave(bn, dim=-2)[..., :rows, :]  # [..., N, ceil(K/bk)]
    full, rest = divmod(cols, bk)
    out[..., : full * bk].unflatten(-1, (full, bk)).mul_(scale[..., :full, None])  # [..., N, full, bk]
    if rest:
        out[..., full * bk :].mul_(scale[..., full:])  # the partial last column block: [..., N, rest] * [..., N, 1]
    return out if dtype == torch.float32 else out.to(dtype)


def quantize_fp8_blocks(
    w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 ``(weight [..., N, K], weight_scale_inv [..., ceil(N/bn), ceil(K/bk)] float32)`` of ``w``.

    transformers' recipe (``Fp8Quantize``, ``scale_fmt="float"``), per ``bn x bk`` block in
    float32: ``scale = 448 / amax`` (1 for an all-zero block), ``weight_scale_inv = 1 / scale``,
    ``weight = clamp(w * scale, -448, 448)`` rounded to e4m3 (nearest even). Bit for bit what
    transformers writes where the block divides the shape; partial edge blocks (which
    transformers leaves unquantized) take the amax of the values they hold. ``w`` must be
    floating point and finite with at least 2 dims (``ValueError`` otherwise).
    """
    bn, bk = _check_block(block)
    if not isinstance(w, torch.Tensor) or not w.dtype.is_floating_point:
        got = w.dtype if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"quantize_fp8_blocks needs a floating-point tensor, got {got}")
    if w.dim() < 2:
        raise ValueError(f"quantize_fp8_blocks needs a weight [..., N, K], got shape {list(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("quantize_fp8_blocks needs finite values; the tensor holds inf or NaN")
    *lead, n, k = w.shape
    nb, kb = math.ceil(n / bn), math.ceil(k / bk)
    padded = torch.zeros(*lead, nb * bn, kb * bk, dtype=torch.float32, device=w.device)
    padded[..., :n, :k] = w  # zeros do not change a block's amax
    tiles = padded.unflatten(-1, (kb, bk)).unflatten(-3, (nb, bn))  # [..., nb, bn, kb, bk]
    amax = tiles.abs().amax(dim=(-3, -1))  # [..., nb, kb]
    scale = torch.where(amax > 0, FP8_MAX / torch.where(amax > 0, amax, 1.0), 1.0)
    inv = (1.0 / scale).to(torch.float32)
    q = (tiles * scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.flatten(-2, -1).flatten(-3, -2)[..., :n, :k].contiguous()  # [..., N, K]
    return q, inv


# --- checkpoints -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Dequantized:
    """A placement's transform that first dequantizes the stored FP8 tensor with its scale."""

    block: tuple[int, int]
    then: Callable[..., torch.Tensor] | None = None

    def __call__(self, weight: torch.Tensor, scale_inv: torch.Tensor, *companions: torch.Tensor) -> torch.Tensor:
        values = dequantize_fp8_blocks(weight, scale_inv, self.block)
        return values if self.then is None else self.then(values, *companions)


@dataclass(frozen=True)
class FP8Scheme:
    """An FP8 block-quantized checkpoint's ``quantization_config``, validated (:meth:`from_hf`)."""

    block: tuple[int, int] = DEFAULT_BLOCK

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "FP8Scheme | None":
        """The scheme of a config.json dict; None unless ``quantization_config.quant_method`` is ``"fp8"``.

        Refuses (``UnsupportedModelError``) what moetrt cannot read exactly: another element format
        than e4m3, static activation scales, ue8m0 scales, FP4 experts, per-tensor scales.
        """
        q = hf.get("quantization_config") or {}
        if not isinstance(q, dict) or q.get("quant_method") != "fp8":
            return None
        fmt = q.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise UnsupportedModelError(
                f"quantization_config.fmt {fmt!r} is not supported: moetrt reads FP8 checkpoints in 'e4m3' "
                "(float8_e4m3fn) only; use the e4m3 release or a bf16 checkpoint"
            )
        scheme = str(q.get("activation_scheme", "dynamic")).lower()
        if scheme == "static":
            raise UnsupportedModelError(
                "quantization_config.activation_scheme 'static' is not supported: its per-tensor input scales "
                "(input_scale / activation_scale tensors) quantize the activations, which moetrt does not do; "
                "use a checkpoint with activation_scheme 'dynamic' or a bf16 one"
            )
        if scheme != "dynamic":
            raise CheckpointError(
                f"quantization_config.activation_scheme {scheme!r} is invalid; allowed: 'dynamic' ('static' is not "
                "supported)"
            )
        for key, default, allowed in (("scale_fmt", "float", "float"), ("expert_dtype", "fp8", "fp8")):
            value = q.get(key, default)
            if value != allowed:
                raise UnsupportedModelError(
                    f"quantization_config.{key} {value!r} is not supported (only {allowed!r}: float32 scales over "
                    "FP8 e4m3 weights); use a checkpoint in DeepSeek-V3's FP8 format or a bf16 one"
                )
        if "weight_block_size" in q and q["weight_block_size"] is None:
            raise UnsupportedModelError(
                "quantization_config.weight_block_size null (one scale per tensor) is not supported; moetrt reads "
                "block-quantized FP8 checkpoints (weight_block_size [rows, cols], e.g. [128, 128])"
            )
        block = q.get("weight_block_size", list(DEFAULT_BLOCK))
        try:
            return cls(_check_block(list(block) if isinstance(block, (list, tuple)) else block))
        except ValueError:
            raise CheckpointError(
                f"quantization_config.weight_block_size {block!r} is invalid; give two positive ints [rows, cols], "
                "e.g. [128, 128]"
            ) from None

    def placements(self, placements: "list[Placement]", name: str) -> "list[Placement]":
        """``placements`` of FP8 tensor ``name``, each dequantizing it first (with its scale as a companion)."""
        scale = scale_name(name)
        return [dataclasses.replace(p, transform=_Dequantized(self.block, p.transform), needs=(scale, *p.needs))
                for p in placements]

    def record(self, tensors: int) -> dict[str, Any]:
        """What ``MoEConfig.extra["source_quantization"]`` says of a checkpoint with ``tensors`` FP8 weights."""
        return {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(self.block),
                "activation_scheme": "dynamic", "scale": "float32 weight_scale_inv per block", "tensors": tensors}
