"""MXFP4 (OCP Microscaling, e2m1 elements with a shared e8m0 scale): dequantize and quantize.

gpt-oss checkpoints store their expert weights this way. Per weight ``name``:

- ``name_blocks`` uint8 ``[..., G, 16]``: 32 e2m1 values per block, two per byte, the low
  nibble first. A nibble is ``sign << 3 | code``; ``code`` 0..7 is 0, 0.5, 1, 1.5, 2, 3, 4, 6.
- ``name_scales`` uint8 ``[..., G]``: e8m0, the block's scale is ``2 ** (scale - 127)``.
  255 is e8m0's NaN and is refused.

``dequantize_mxfp4`` computes bit for bit what transformers' ``_convert_moe_packed_tensors``
computes before its final ``transpose(1, 2)``: the value looked up in ``dtype``, then
``torch.ldexp`` by the exponent (so a product past the dtype's range is inf, as there).
"""

from __future__ import annotations

import math

import torch

from moetrt.errors import CheckpointError

__all__ = ["FP4_VALUES", "dequantize_mxfp4", "quantize_mxfp4", "MXFP4_BLOCK"]

#: values per block (one shared scale)
MXFP4_BLOCK = 32

#: the e2m1 value of each nibble 0..15 (bit 3 is the sign)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

_E8M0_BIAS = 127
_E8M0_NAN = 255
_E2M1_EMAX = 2  # the exponent of e2m1's largest value, 6 = 1.5 * 2**2
# rows (blocks) per chunk: bounds the temporaries (int32 indices, float32 scratch) to ~64 MiB
_ROWS_PER_CHUNK = 1 << 19


def _check_chunk(rows_per_chunk: int) -> None:
    if isinstance(rows_per_chunk, bool) or not isinstance(rows_per_chunk, int) or rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be a positive int, got {rows_per_chunk!r}")


def dequantize_mxfp4(
    blocks: torch.Tensor,
    scales: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    *,
    rows_per_chunk: int = _ROWS_PER_CHUNK,
) -> torch.Tensor:
    """The ``[..., G * 32]`` values in ``dtype`` of MXFP4 ``blocks`` ``[..., G, 16]`` and ``scales`` ``[..., G]``.

    Works through ``rows_per_chunk`` blocks at a time, so the memory beyond the output stays
    bounded. Raises ``CheckpointError`` for tensors that are not MXFP4 (dtype, shapes, a NaN
    scale) and ``ValueError`` for a ``dtype`` that is not floating point.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dequantize_mxfp4 dtype must be a floating-point torch.dtype, got {dtype!r}")
    _check_chunk(rows_per_chunk)
    for name, t in (("blocks", blocks), ("scales", scales)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise CheckpointError(f"MXFP4 {name} must be a uint8 tensor, got {got}")
    if blocks.dim() < 2 or blocks.shape[-1] != MXFP4_BLOCK // 2:
        raise CheckpointError(
            f"MXFP4 blocks must have shape [..., G, {MXFP4_BLOCK // 2}] (two values a byte), got {list(blocks.shape)}"
        )
    if scales.shape != blocks.shape[:-1]:
        raise CheckpointError(
            f"MXFP4 scales shape {list(scales.shape)} does not match blocks shape {list(blocks.shape)}: "
            f"expected {list(blocks.shape[:-1])} (one scale per block of {MXFP4_BLOCK})"
        )
    if scales.numel() and int(scales.max()) == _E8M0_NAN:
        raise CheckpointError(f"MXFP4 scales hold {_E8M0_NAN} (e8m0 NaN); the checkpoint is corrupt")

    *prefix, groups, nbytes = blocks.shape
    rows = math.prod(prefix) * groups
    blocks = blocks.reshape(rows, nbytes)  # [R, 16]
    exponents = scales.reshape(rows, 1).to(torch.int32) - _E8M0_BIAS  # [R, 1]
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    out = torch.empty(rows, 2 * nbytes, dtype=dtype, device=blocks.device)  # [R, 32]
    for r0 in range(0, rows, rows_per_chunk):
        blk, sub = blocks[r0 : r0 + rows_per_chunk], out[r0 : r0 + rows_per_chunk]
        sub[:, 0::2] = lut[(blk & 0x0F).to(torch.int)]  # low nibble first
        sub[:, 1::2] = lut[(blk >> 4).to(torch.int)]
        torch.ldexp(sub, exponents[r0 : r0 + rows_per_chunk], out=sub)
    return out.reshape(*prefix, groups * 2 * nbytes)  # [..., G * 32]


# midpoints between consecutive e2m1 magnitudes (codes c and c + 1), and whether a value exactly
# at the midpoint rounds up: ties go to the even code (mantissa bit 0), as IEEE round-to-nearest-even
_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def quantize_mxfp4(
    w: torch.Tensor, *, rows_per_chunk: int = _ROWS_PER_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 ``(blocks [..., K/32, 16], scales [..., K/32])`` of a floating-point ``w`` ``[..., K]``.

    The OCP MX recipe, per block of 32 consecutive values along the last dimension:

    - shared exponent ``e = floor(log2(amax)) - 2`` (2: the exponent of e2m1's largest value,
      6.0), clamped to e8m0's ``[-127, 127]``; an all-zero block gets ``e = -127``;
    - each value ``v / 2**e`` is rounded to the nearest e2m1 value, ties to the even code
      (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4), and
      magnitudes above 6 saturate to 6 (only values within ``[6, 8) * 2**e`` of the block's
      largest can exceed it); the sign is kept, so a negative value that rounds to 0 is -0.

    So every value lies within half a grid step of its dequantized value unless it saturated,
    and values already on a block's grid round-trip exactly. ``K`` must be a multiple of 32 and
    ``w`` finite (``ValueError`` otherwise).
    """
    _check_chunk(rows_per_chunk)
    if not isinstance(w, torch.Tensor) or not w.dtype.is_floating_point:
        got = w.dtype if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"quantize_mxfp4 needs a floating-point tensor, got {got}")
    if w.dim() < 1 or w.shape[-1] % MXFP4_BLOCK:
        raise ValueError(
            f"quantize_mxfp4 needs the last dimension a multiple of {MXFP4_BLOCK}, got shape {list(w.shape)}"
        )
    if not bool(torch.isfinite(w).all()):
        raise ValueError("quantize_mxfp4 needs finite values; the tensor holds inf or NaN")

    *prefix, k = w.shape
    groups = k // MXFP4_BLOCK
    # float32 holds bf16/fp16 exactly, and v / 2**e is exact in it; float64 stays float64
    work = torch.float64 if w.dtype == torch.float64 else torch.float32
    rows = w.reshape(-1, MXFP4_BLOCK)  # [R, 32]
    blocks = torch.empty(rows.shape[0], MXFP4_BLOCK // 2, dtype=torch.uint8, device=w.device)  # [R, 16]
    scales = torch.empty(rows.shape[0], dtype=torch.uint8, device=w.device)  # [R]
    for r0 in range(0, rows.shape[0], rows_per_chunk):
        v = rows[r0 : r0 + rows_per_chunk].to(work)  # [r, 32]
        amax = v.abs().amax(dim=-1)  # [r]
        _, e = torch.frexp(amax)  # amax = m * 2**e, m in [0.5, 1): floor(log2(amax)) = e - 1 (exact)
        shared = torch.where(amax > 0, e - 1 - _E2M1_EMAX, -_E8M0_BIAS).clamp(-_E8M0_BIAS, _E8M0_BIAS)  # [r]
        q = torch.ldexp(v, -shared[:, None])  # [r, 32], exact: a power-of-two scaling
        mag = q.abs()
        code = torch.zeros_like(mag, dtype=torch.uint8)
        for m, tie_up in _MIDPOINTS:
            code += (mag >= m if tie_up else mag > m).to(torch.uint8)
        nibble = code | (torch.signbit(q).to(torch.uint8) << 3)  # [r, 32]
        blocks[r0 : r0 + rows_per_chunk] = nibble[:, 0::2] | (nibble[:, 1::2] << 4)  # low nibble first
        scales[r0 : r0 + rows_per_chunk] = (shared + _E8M0_BIAS).to(torch.uint8)
    return blocks.reshape(*prefix, groups, MXFP4_BLOCK // 2), scales.reshape(*prefix, groups)
