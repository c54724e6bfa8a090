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

FP8 experts (``Session(..., backend="torch", device="cuda", expert_precision="fp8")``): the routed
experts run as FP8 e4m3 grouped GEMMs (``moetrt.ops.kernels.sparse_moe_fp8_triton``) with

- weights ``[E, N, K]`` e4m3 and float32 scales ``[E, ceil(N/bn), ceil(K/bk)]``, the checkpoints'
  layout: ``weight_scales="block"`` (``bn x bk`` blocks, :data:`DEFAULT_BLOCK`) or ``"channel"``
  (one scale per output row: the block ``(1, K)``);
- activations quantized dynamically, per token (``activation_scales="token"``: one scale per row,
  the block ``(1, K)``) or per token and 128 columns (``"block"``, as DeepSeek-V3 runs them:
  ``(1, bk)``), with the same recipe as the weights (:func:`quantize_fp8_blocks`);
- products of e4m3 values summed in float32 within one K block (where both scales are constant),
  each block's sum times its activation and weight scales added to a float32 accumulator.

:func:`e4m3_from_float32`, :func:`e4m3_to_float32`, :func:`quantize_fp8_blocks_reference` and
:func:`sparse_moe_fp8_reference` are the NumPy reference of all of it: bit for bit torch's
``float8_e4m3fn`` casts and :func:`quantize_fp8_blocks`, and the expert computation in float64
from those bytes. When the checkpoint is FP8 in ``bn x bk`` blocks, its expert bytes and scales go
to the GPU unchanged (:func:`FP8Experts.from_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from moetrt.errors import CheckpointError, MoetrtError, UnsupportedModelError

if TYPE_CHECKING:
    from moetrt.families import Placement

__all__ = [
    "FP8_DTYPE", "FP8_MAX", "DEFAULT_BLOCK", "FLOAT8_DTYPES", "FP8Scheme", "dequantize_fp8_blocks", "quantize_fp8_blocks",
    "scale_name", "is_scale_name", "scale_shape",
    "FP8_FORMAT", "EXPERT_PRECISIONS", "WEIGHT_SCALES", "ACTIVATION_SCALES", "FP8_MIN_CAPABILITY",
    "e4m3_from_float32", "e4m3_to_float32", "quantize_fp8_blocks_reference", "sparse_moe_fp8_reference",
    "weight_block", "activation_block", "FP8Experts", "fp8_experts", "check_fp8_device", "check_fp8_experts",
    "sparse_moe_fp8_torch",
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
#: the one element format (config.json's ``quantization_config.fmt``; Triton's ``fp8e4nv``)
FP8_FORMAT = "e4m3"
#: ``expert_precision`` of the torch back end: ``"model"`` (the model's dtype) or ``"fp8"``
EXPERT_PRECISIONS = ("model", "fp8")
#: FP8 expert weight scales: ``bn x bk`` blocks, or one per output channel (row)
WEIGHT_SCALES = ("block", "channel")
#: FP8 expert activation scales: one per token (row), or per token and ``bk`` columns
ACTIVATION_SCALES = ("token", "block")
#: FP8 tensor cores: Ada (sm_89) and Hopper (sm_90) and later
FP8_MIN_CAPABILITY = (8, 9)


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
    float32: ``scale = 448 / amax`` (computed as ``448 * (1 / amax)``, as torch evaluates
    ``448.0 / tensor``; 1 for an all-zero block), ``weight_scale_inv = 1 / scale``,
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


# --- NumPy reference: e4m3 rounding, block quantization, the FP8 expert computation -------------
_E4M3_NAN = 0x7F  # the code of NaN (with the sign bit: 0xFF); e4m3fn has no infinities
_E4M3_MIN_NORMAL_EXP = -6  # below 2**-6 the values are subnormal: multiples of 2**-9


def e4m3_to_float32(codes: np.ndarray) -> np.ndarray:
    """The float32 values of e4m3fn ``codes`` (uint8): ``(-1)^s (1 + m/8) 2^(e-7)``, subnormal ``m 2^-9``, NaN."""
    c = np.asarray(codes, dtype=np.uint8)
    exponent = ((c >> 3) & 0xF).astype(np.float64)
    mantissa = (c & 0x7).astype(np.float64)
    magnitude = np.where(exponent == 0, mantissa * 2.0**-9, (8.0 + mantissa) * np.exp2(exponent - 10.0))
    values = np.where(c & 0x80, -magnitude, magnitude)
    nan = np.where(c & 0x80, -np.nan, np.nan)  # NaN keeps its sign bit, as torch's cast reads it
    return np.where((c & 0x7F) == _E4M3_NAN, nan, values).astype(np.float32)


def e4m3_from_float32(values: np.ndarray) -> np.ndarray:
    """The e4m3fn codes (uint8) of float32 ``values``, as torch's ``tensor.to(torch.float8_e4m3fn)``.

    Rounded to nearest, ties to even; saturating: magnitudes past 448 (infinities too) give
    ±448 (``0x7E`` / ``0xFE``), as Hopper's ``cvt.rn.satfinite.e4m3x2.f32`` does; NaN gives
    ``0x7F`` with its sign bit; -0.0 gives ``0x80``; magnitudes up to 2**-10 round to zero.
    """
    v = np.asarray(values, dtype=np.float32).astype(np.float64)  # every float32 is exact in float64
    sign = np.signbit(v).astype(np.uint8) << 7
    a = np.abs(v)
    nan = np.isnan(a)
    finite = np.where(nan, 0.0, np.minimum(a, FP8_MAX))
    _, exp2 = np.frexp(finite)  # finite = m 2^exp2, m in [0.5, 1): floor(log2) = exp2 - 1
    exponent = np.maximum(exp2 - 1, _E4M3_MIN_NORMAL_EXP)
    ulp = np.exp2(exponent - 3.0)  # 3 mantissa bits
    rounded = np.rint(finite / ulp) * ulp  # exact scaling; rint rounds half to even
    _, exp2 = np.frexp(rounded)
    exponent = exp2 - 1
    normal = rounded >= 2.0**_E4M3_MIN_NORMAL_EXP
    field = np.where(normal, exponent + 7, 0)
    mantissa = np.where(normal, rounded / np.exp2(np.where(normal, exponent, 0) - 3.0) - 8.0, rounded / 2.0**-9)
    code = (field.astype(np.int64) << 3 | mantissa.astype(np.int64)).astype(np.uint8)
    return np.where(nan, _E4M3_NAN, code).astype(np.uint8) | sign


def quantize_fp8_blocks_reference(w: np.ndarray, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """NumPy twin of :func:`quantize_fp8_blocks`: ``(codes uint8 [..., N, K], scale_inv float32 [..., nb, kb])``.

    Per ``bn x bk`` block in float32: ``scale = 448 * (1 / amax)`` (two roundings: that is what
    torch computes for ``448.0 / tensor``, ``tensor.reciprocal() * 448``, on every device; 1 for an
    all-zero block), ``scale_inv = 1 / scale``, ``codes = e4m3(clamp(w * scale, -448, 448))``. Per-token activation
    scales are the block ``(1, K)``; DeepSeek's per-128-column activation scales ``(1, 128)``.
    """
    bn, bk = _check_block(block)
    w = np.asarray(w, dtype=np.float32)
    *lead, n, k = w.shape
    nb, kb = math.ceil(n / bn), math.ceil(k / bk)
    padded = np.zeros((*lead, nb * bn, kb * bk), dtype=np.float32)
    padded[..., :n, :k] = w
    tiles = padded.reshape(*lead, nb, bn, kb, bk)
    amax = np.abs(tiles).max(axis=(-3, -1))  # [..., nb, kb]
    scale = np.where(amax > 0, np.float32(FP8_MAX) * (np.float32(1) / np.where(amax > 0, amax, np.float32(1))),
                     np.float32(1))
    scale = scale.astype(np.float32)
    inv = (np.float32(1) / scale).astype(np.float32)
    scaled = np.clip(tiles * scale[..., :, None, :, None], -FP8_MAX, FP8_MAX).astype(np.float32)
    codes = e4m3_from_float32(scaled).reshape(*lead, nb * bn, kb * bk)[..., :n, :k]
    return np.ascontiguousarray(codes), inv


def _dequantize_np(codes: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """float64 values of e4m3 ``codes [..., N, K]`` times their block scales (exact: 4 x 24 bits)."""
    rows = np.arange(codes.shape[-2]) // block[0]
    cols = np.arange(codes.shape[-1]) // block[1]
    scale = np.asarray(scale_inv, np.float64)[..., rows, :][..., :, cols]
    return e4m3_to_float32(codes).astype(np.float64) * scale


def weight_block(weight_scales: str, shape: tuple[int, ...], block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, int]:
    """The scale block of an expert weight ``[..., N, K]``: ``block``, or ``(1, K)`` for ``"channel"``."""
    if weight_scales not in WEIGHT_SCALES:
        raise ValueError(f"weight_scales must be one of {WEIGHT_SCALES}, got {weight_scales!r}")
    return _check_block(block) if weight_scales == "block" else (1, int(shape[-1]))


def activation_block(activation_scales: str, k: int, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, int]:
    """The scale block of activations ``[rows, K]``: ``(1, K)`` per token, ``(1, bk)`` for ``"block"``."""
    if activation_scales not in ACTIVATION_SCALES:
        raise ValueError(f"activation_scales must be one of {ACTIVATION_SCALES}, got {activation_scales!r}")
    return (1, int(k)) if activation_scales == "token" else (1, _check_block(block)[1])


def sparse_moe_fp8_reference(
    x: np.ndarray,
    weights: np.ndarray,
    indices: np.ndarray,
    w_gate_up: np.ndarray,
    s_gate_up: np.ndarray,
    w_down: np.ndarray,
    s_down: np.ndarray,
    gate_up_block: tuple[int, int],
    down_block: tuple[int, int],
    activation_scales: str = "token",
    block: tuple[int, int] = DEFAULT_BLOCK,
    activation: str = "silu",
) -> np.ndarray:
    """``moetrt::SparseMoE`` with FP8 experts, in float64 from the bytes: ``y [T, D]`` float64.

    ``w_gate_up`` e4m3 codes ``[E, 2F, D]`` with scales ``s_gate_up`` in ``gate_up_block``,
    ``w_down`` codes ``[E, D, F]`` with ``s_down`` in ``down_block``. Each token's ``x`` (float32)
    is quantized in :func:`activation_block` blocks; ``h = act(gate) * up`` is computed from the
    dequantized products, rounded to float32 (the kernels keep it in the model dtype: float32 when
    ``x`` is) and quantized the same way per (token, slot) before the down projection. Every
    product and scale is exact here; a kernel differs only in how it rounds its float32 sums.
    """
    if activation not in ("silu", "gelu_tanh"):
        raise ValueError(f"FP8 experts implement activation 'silu' and 'gelu_tanh', got {activation!r}")
    x = np.asarray(x, np.float32)
    ffn = w_down.shape[2]
    xq, xs = quantize_fp8_blocks_reference(x, activation_block(activation_scales, x.shape[1], block))
    xd = _dequantize_np(xq, xs, activation_block(activation_scales, x.shape[1], block))  # [T, D]
    y = np.zeros(x.shape, dtype=np.float64)
    for t in range(indices.shape[0]):
        for j in range(indices.shape[1]):
            e = int(indices[t, j])
            gate_up = _dequantize_np(w_gate_up[e], s_gate_up[e], gate_up_block) @ xd[t]  # [2F]
            gate, up = gate_up[:ffn], gate_up[ffn:]
            if activation == "silu":
                h = gate / (1.0 + np.exp(-gate)) * up
            else:
                h = 0.5 * gate * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (gate + 0.044715 * gate**3))) * up
            hb = activation_block(activation_scales, ffn, block)
            hq, hs = quantize_fp8_blocks_reference(h.astype(np.float32)[None, :], hb)
            hd = _dequantize_np(hq, hs, hb)[0]  # [F]
            y[t] += float(weights[t, j]) * (_dequantize_np(w_down[e], s_down[e], down_block) @ hd)
    return y


# --- FP8 experts for the torch back end -----------------------------------------------------------
def check_fp8_device(device: torch.device) -> None:
    """Raise a one-line ``MoetrtError`` unless FP8 experts can run on ``device`` (CUDA, sm_89+, triton)."""
    import importlib.util

    if device.type != "cuda":
        raise MoetrtError(
            f"expert_precision='fp8' runs on NVIDIA GPUs with FP8 tensor cores (compute capability "
            f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} or later), got device={str(device)!r}; use device='cuda', "
            "or expert_precision='model'"
        )
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < FP8_MIN_CAPABILITY:
        raise MoetrtError(
            f"expert_precision='fp8' needs FP8 tensor cores (compute capability {FP8_MIN_CAPABILITY[0]}."
            f"{FP8_MIN_CAPABILITY[1]} or later: L4, L40, H100, H200), but {torch.cuda.get_device_name(device)} is "
            f"{capability[0]}.{capability[1]}; use expert_precision='model'"
        )
    if importlib.util.find_spec("triton") is None:
        raise MoetrtError("expert_precision='fp8' runs Triton kernels: pip install 'moetrt[gpu]' (triton)")


def check_fp8_experts(who: str, w_gate_up, s_gate_up, w_down, s_down, gate_up_block, down_block,
                      activation_scales: str) -> None:
    """``ValueError`` naming ``who`` unless the FP8 expert tensors fit: e4m3 ``[E, 2F, D]`` / ``[E, D, F]``
    weights, float32 scales in their blocks, a known ``activation_scales``."""
    if activation_scales not in ACTIVATION_SCALES:
        raise ValueError(f"{who}: activation_scales must be one of {ACTIVATION_SCALES}, got {activation_scales!r}")
    for name, w, s, blk in (("gate_up", w_gate_up, s_gate_up, gate_up_block), ("down", w_down, s_down, down_block)):
        if w.dtype != FP8_DTYPE or w.dim() != 3:
            raise ValueError(f"{who}: w_{name} must be {FP8_DTYPE} [E, N, K], got {w.dtype} {list(w.shape)}")
        expected = scale_shape(tuple(w.shape), _check_block(blk))
        if s.dtype != torch.float32 or tuple(s.shape) != expected:
            raise ValueError(f"{who}: s_{name} must be float32 {list(expected)} (blocks {list(blk)}), got {s.dtype} "
                             f"{list(s.shape)}")
    num_experts, two_f, dim = w_gate_up.shape
    if two_f % 2 or tuple(w_down.shape) != (num_experts, dim, two_f // 2):
        raise ValueError(f"{who}: w_gate_up {list(w_gate_up.shape)} and w_down {list(w_down.shape)} are not "
                         "[E, 2F, D] and [E, D, F]")


def _kept_dtype_apply(module: torch.nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    # moves the buffers with fn (to another device) but keeps their dtypes: the FP8 bytes and float32 scales
    # do not follow model.to(torch.bfloat16)
    for name, buffer in module._buffers.items():
        if buffer is not None:
            moved = fn(buffer)
            module._buffers[name] = buffer.to(moved.device) if moved.dtype != buffer.dtype else moved


class FP8Experts(torch.nn.Module):
    """The routed experts of one MoE layer in FP8 e4m3, in place of :class:`moetrt.model.Experts`.

    Buffers ``w_gate_up`` ``[E, 2F, D]`` and ``w_down`` ``[E, D, F]`` float8_e4m3fn, ``s_gate_up`` /
    ``s_down`` float32 in ``gate_up_block`` / ``down_block`` (:func:`weight_block`); activations
    quantized per :data:`ACTIVATION_SCALES` ``activation_scales``. ``model.to(dtype)`` moves them
    to another device but keeps their dtypes. On CUDA with the Triton kernels registered they run
    ``sparse_moe_fp8_triton``; elsewhere :func:`sparse_moe_fp8_torch`, the same arithmetic in torch
    (what the tests on the CPU check the conversion with).
    """

    fp8 = True  # MoEBlock.forward calls this module instead of the SparseMoE op

    def __init__(self, w_gate_up: torch.Tensor, s_gate_up: torch.Tensor, w_down: torch.Tensor, s_down: torch.Tensor,
                 gate_up_block: tuple[int, int], down_block: tuple[int, int], activation_scales: str = "token",
                 block: tuple[int, int] = DEFAULT_BLOCK):
        super().__init__()
        check_fp8_experts("FP8Experts", w_gate_up, s_gate_up, w_down, s_down, gate_up_block, down_block,
                          activation_scales)
        self.gate_up_block, self.down_block = _check_block(gate_up_block), _check_block(down_block)
        self.activation_scales, self.block = activation_scales, _check_block(block)
        self.register_buffer("w_gate_up", w_gate_up)
        self.register_buffer("s_gate_up", s_gate_up)
        self.register_buffer("w_down", w_down)
        self.register_buffer("s_down", s_down)

    @classmethod
    def from_weights(cls, gate_up: torch.Tensor, down: torch.Tensor, weight_scales: str = "block",
                     activation_scales: str = "token", block: tuple[int, int] = DEFAULT_BLOCK) -> "FP8Experts":
        """Quantize stacked expert weights (any float dtype) with :func:`quantize_fp8_blocks`, one expert at a
        time (blocks never span experts, so the bytes are those of the whole tensor at once; the float32
        copy is one expert's)."""
        gate_up_block = weight_block(weight_scales, tuple(gate_up.shape), block)
        down_block = weight_block(weight_scales, tuple(down.shape), block)

        def stacked(w: torch.Tensor, blk: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
            parts = [quantize_fp8_blocks(w[e].detach().float(), blk) for e in range(w.shape[0])]
            return torch.stack([q for q, _ in parts]), torch.stack([s for _, s in parts])

        return cls(*stacked(gate_up, gate_up_block), *stacked(down, down_block), gate_up_block, down_block,
                   activation_scales, block)

    def _apply(self, fn, recurse=True):
        _kept_dtype_apply(self, fn)
        return self

    def extra_repr(self) -> str:
        e, two_f, d = self.w_gate_up.shape
        return (f"experts={e}, dim={d}, ffn={two_f // 2}, {FP8_FORMAT}, gate_up_block={list(self.gate_up_block)}, "
                f"down_block={list(self.down_block)}, activation_scales={self.activation_scales!r}")

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, activation: str = "silu"):
        """``y [T, D]`` in x's dtype of tokens ``x [T, D]`` routed by ``weights`` / ``indices`` ``[T, K]``."""
        from moetrt.ops import kernels

        args = (x, weights, indices, self.w_gate_up, self.s_gate_up, self.w_down, self.s_down, self.gate_up_block,
                self.down_block, self.activation_scales, self.block, activation)
        if x.is_cuda and kernels._registered:
            from moetrt.ops.kernels.sparse_moe_fp8_triton import sparse_moe_fp8_triton

            return sparse_moe_fp8_triton(*args)
        return sparse_moe_fp8_torch(*args)


def sparse_moe_fp8_torch(x, weights, indices, w_gate_up, s_gate_up, w_down, s_down, gate_up_block, down_block,
                         activation_scales="token", block=DEFAULT_BLOCK, activation="silu") -> torch.Tensor:
    """The FP8 expert computation in torch (any device), as the kernels do it: ``y [T, D]`` in x's dtype.

    Activations quantized per :func:`activation_block`, products of dequantized values in float32,
    ``h`` rounded to x's dtype and quantized per (token, slot), each slot's output rounded to x's
    dtype, the slots summed in float32.
    """
    from moetrt.ops.sparse_moe import _activation

    num_tokens, dim = x.shape
    ffn, k = w_down.shape[2], indices.shape[1]
    x_block, h_block = activation_block(activation_scales, dim, block), activation_block(activation_scales, ffn, block)
    xd = dequantize_fp8_blocks(*quantize_fp8_blocks(x.float(), x_block), x_block)  # [T, D]
    y = torch.zeros(num_tokens, dim, dtype=torch.float32, device=x.device)
    flat = indices.reshape(-1).long()  # [P]
    for e in flat.unique().tolist():
        if not 0 <= e < w_gate_up.shape[0]:
            continue  # out-of-range experts contribute nothing, as in the kernels
        pairs = (flat == e).nonzero().squeeze(1)  # [n]
        tokens = pairs // k
        gate_up = xd[tokens] @ dequantize_fp8_blocks(w_gate_up[e], s_gate_up[e], gate_up_block).T  # [n, 2F]
        h = _activation(gate_up, ffn, activation, 0.0, 0.0).to(x.dtype)  # [n, F]
        hd = dequantize_fp8_blocks(*quantize_fp8_blocks(h.float(), h_block), h_block)
        out = hd @ dequantize_fp8_blocks(w_down[e], s_down[e], down_block).T  # [n, D]
        out = (out * weights.reshape(-1)[pairs, None].float()).to(x.dtype)
        y.index_add_(0, tokens, out.float())
    return y.to(x.dtype)


def _checkpoint_expert_bytes(folder: Any, block: tuple[int, int]) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The FP8 bytes and scales of every stacked expert parameter of checkpoint ``folder``, as stored.

    ``{"layers.0.mlp": {"gate_up_proj": (q [E, 2F, D], scale_inv [E, 2F/bn, D/bk]), "down_proj": ...}}``
    for the layers whose experts are stored in FP8 with no other transform than their placement;
    gate and up rows stored apart stack only when ``F`` is a multiple of ``bn`` (else those layers
    are left out, and quantized from the dequantized values instead).
    """
    from moetrt.checkpoint import TransformedPiece, checkpoint_sources

    cfg, sources = checkpoint_sources(folder)
    out: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, source in sources.items():
        if not (name.endswith(".experts.gate_up_proj") or name.endswith(".experts.down_proj")):
            continue
        pieces = source.pieces
        plain = all(isinstance(p, TransformedPiece) and isinstance(p.placement.transform, _Dequantized)
                    and p.placement.transform.then is None and p.placement.transform.block == block for p in pieces)
        per_expert = len(pieces) // cfg.num_experts
        if not plain or (per_expert == 2 and cfg.intermediate_size % block[0]):
            continue
        qs, ss = [], []
        for piece in pieces:
            stored, scale = piece.stored, piece.companions[0]
            if piece.placement.select is not None:
                stored, scale = stored.select(piece.placement.select), scale.select(piece.placement.select)
            qs.append(stored.read())
            ss.append(scale.read().float())
        q = torch.stack([torch.cat(qs[e * per_expert:(e + 1) * per_expert]) for e in range(cfg.num_experts)])
        s = torch.stack([torch.cat(ss[e * per_expert:(e + 1) * per_expert]) for e in range(cfg.num_experts)])
        layer, param = name.rsplit(".experts.", 1)
        out.setdefault(layer, {})[param] = (q, s)
    return {layer: params for layer, params in out.items() if len(params) == 2}


def fp8_experts(model: Any, weight_scales: str = "block", activation_scales: str = "token",
                block: tuple[int, int] | None = None, checkpoint: Any = None) -> dict[str, int]:
    """Replace the routed experts of every MoE layer of ``model`` by :class:`FP8Experts`, in place.

    ``block``: the weight scale block (default: the checkpoint's ``weight_block_size`` when the model
    came from an FP8 checkpoint, else :data:`DEFAULT_BLOCK`). ``checkpoint``: the folder the model
    was read from (``model.source_dir``); when it is FP8 in ``block`` blocks and ``weight_scales``
    is ``"block"``, its expert bytes and scales are taken as stored, not requantized. Returns
    ``{"from_checkpoint": layers, "quantized": layers}``. Refuses (``MoetrtError``) experts with
    biases or an activation the FP8 kernels do not implement.
    """
    from moetrt.model import MoEBlock

    record = model.config.extra.get("source_quantization") or {}
    source_block = tuple(record["weight_block_size"]) if record.get("quant_method") == "fp8" else None
    block = _check_block(block if block is not None else (source_block or DEFAULT_BLOCK))
    weight_block(weight_scales, (1, 1), block)  # validates the names
    activation_block(activation_scales, 1, block)
    if "block" in (weight_scales, activation_scales):  # the kernels' K tile lies inside a scale block
        from moetrt.ops.kernels.configs import fp8_block_k

        fp8_block_k(block[1])
    stored = {}
    if checkpoint is not None and source_block == block and weight_scales == "block":
        stored = _checkpoint_expert_bytes(checkpoint, block)
    counts = {"from_checkpoint": 0, "quantized": 0}
    for name, module in model.named_modules():
        if not isinstance(module, MoEBlock) or getattr(module.experts, "fp8", False):
            continue
        experts = module.experts
        if experts.gate_up_proj_bias is not None or module.activation not in ("silu", "gelu_tanh"):
            raise MoetrtError(
                f"expert_precision='fp8' runs experts without biases and with activation 'silu' or 'gelu_tanh'; "
                f"{name} has {'biases and ' if experts.gate_up_proj_bias is not None else ''}activation "
                f"{module.activation!r}: use expert_precision='model'"
            )
        if getattr(module, "weight_input", 0):
            raise MoetrtError(
                f"expert_precision='fp8' weights the experts' outputs; {name} weights their inputs (Llama 4's "
                "routing, SparseMoE weight_input=1), which the FP8 kernels do not implement: use expert_precision='model'"
            )
        device = experts.gate_up_proj.device
        if name in stored:
            (wgu, sgu), (wd, sd) = stored[name]["gate_up_proj"], stored[name]["down_proj"]
            new = FP8Experts(wgu, sgu, wd, sd, block, block, activation_scales, block)
            counts["from_checkpoint"] += 1
        else:
            new = FP8Experts.from_weights(experts.gate_up_proj, experts.down_proj, weight_scales, activation_scales,
                                          block)
            counts["quantized"] += 1
        module.experts = new.to(device)
    return counts
