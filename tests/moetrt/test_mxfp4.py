"""MXFP4 dequantization against transformers' gpt-oss converter, and the quantizer's rounding.

Dequantization is compared bit for bit (every byte value under every scale, random tensors in
bf16/fp16/fp32, chunked and not); the quantizer is checked against an independent per-value
reading of the OCP MX recipe (scale from the block's amax, nearest grid point, saturation).
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.integrations.mxfp4 import FP4_VALUES as HF_FP4_VALUES
from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

from moetrt.errors import CheckpointError
from moetrt.mxfp4 import FP4_VALUES, MXFP4_BLOCK, dequantize_mxfp4, quantize_mxfp4

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# blocks shapes [..., G, 16] of the random tests (gpt-oss stores [E, R, G, 16])
SHAPES = [(3, 5, 4, 16), (2, 7, 1, 16), (1, 3, 6, 16)]
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}

E2M1 = sorted({abs(v) for v in FP4_VALUES})  # 0, 0.5, 1, 1.5, 2, 3, 4, 6


def _bits(t: torch.Tensor) -> torch.Tensor:
    # compare as integers: NaN == NaN, and -0.0 != +0.0
    return t.contiguous().view(_BITS[t.element_size()])


def _reference(blocks, scales, dtype):
    return _convert_moe_packed_tensors(blocks, scales, dtype=dtype).transpose(1, 2)  # back to [E, R, G*32]


def test_value_table_is_transformers():
    assert list(FP4_VALUES) == list(HF_FP4_VALUES)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_byte_under_every_scale_matches_transformers(dtype):
    # rows: every scale 0..254 (2**-127 .. 2**127, past bf16/fp32 range at the top: inf, 0*inf NaN)
    scales = torch.arange(255, dtype=torch.uint8)[None, :, None].expand(1, 255, 16).contiguous()  # [1, 255, 16]
    blocks = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(16, 16)  # [G=16, 16]: every byte
    blocks = blocks[None, None].expand(1, 255, 16, 16).contiguous()  # [1, 255, 16, 16]
    got = dequantize_mxfp4(blocks, scales, dtype)
    assert got.shape == (1, 255, 16 * MXFP4_BLOCK) and got.dtype == dtype
    assert torch.equal(_bits(got), _bits(_reference(blocks, scales, dtype)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows_per_chunk", [1, 7, 1 << 19])
def test_random_tensors_match_transformers(dtype, shape, rows_per_chunk):
    g = torch.Generator().manual_seed(sum(shape) + rows_per_chunk)
    blocks = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    scales = torch.randint(0, 255, shape[:-1], dtype=torch.uint8, generator=g)
    scales.view(-1)[:2] = torch.tensor([0, 254], dtype=torch.uint8)  # the extremes
    got = dequantize_mxfp4(blocks, scales, dtype, rows_per_chunk=rows_per_chunk)
    assert got.shape == (*shape[:-2], shape[-2] * MXFP4_BLOCK)
    assert torch.equal(_bits(got), _bits(_reference(blocks, scales, dtype)))


def test_layout_low_nibble_first():
    blocks = torch.zeros(1, 16, dtype=torch.uint8)
    blocks[0, 0] = 0x72  # low nibble 2 (1.0), high nibble 7 (6.0)
    blocks[0, 1] = 0x9F  # low nibble 15 (-6.0), high nibble 9 (-0.5)
    got = dequantize_mxfp4(blocks, torch.tensor([128], dtype=torch.uint8), torch.float32)  # scale 2
    assert got[:4].tolist() == [2.0, 12.0, -12.0, -1.0]
    assert got[4:].tolist() == [0.0] * 28


# ---- quantize -------------------------------------------------------------------------------


def _check_recipe(w: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> None:
    """Every block's scale and every value's rounding, read independently from the OCP recipe."""
    deq = dequantize_mxfp4(blocks, scales, torch.float64).reshape(-1, MXFP4_BLOCK)
    for row, (vals, got, scale) in enumerate(zip(w.double().reshape(-1, MXFP4_BLOCK), deq, scales.reshape(-1))):
        amax = vals.abs().max().item()
        exp = max(-127, math.floor(math.log2(amax)) - 2) if amax > 0 else -127
        assert int(scale) - 127 == exp, f"block {row}: scale exponent {int(scale) - 127}, expected {exp}"
        step = 2.0**exp
        grid = torch.tensor([g * step for g in E2M1], dtype=torch.float64)
        for v, d in zip(vals.tolist(), got.tolist()):
            assert abs(d) / step in E2M1 and (math.copysign(1, d) == math.copysign(1, v)), (v, d)
            if abs(v) >= 6 * step:  # saturates
                assert abs(d) == 6 * step, (v, d)
            else:  # a nearest grid point: within half a step of the block's grid
                assert abs(abs(v) - abs(d)) == (grid - abs(v)).abs().min().item(), (v, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_quantize_follows_the_ocp_recipe(dtype):
    g = torch.Generator().manual_seed(1)
    spread = torch.logspace(-6, 4, 8, dtype=torch.float64)[:, None, None]  # blocks of very different magnitude
    w = (torch.randn(8, 3, 64, generator=g, dtype=torch.float64) * spread).to(dtype)
    w[0, 0, :32] = 0.0  # an all-zero block
    w[1, 0, 5] = -0.0
    blocks, scales = quantize_mxfp4(w)
    assert blocks.shape == (8, 3, 2, 16) and scales.shape == (8, 3, 2)
    assert blocks.dtype == scales.dtype == torch.uint8
    _check_recipe(w, blocks, scales)
    # error bound as a whole: half the widest step (2 at scale 1, i.e. 1) or saturation at 6 of [6, 8)
    deq = dequantize_mxfp4(blocks, scales, torch.float64).reshape(-1, MXFP4_BLOCK)
    exps = scales.reshape(-1, 1).to(torch.int32) - 127
    step = torch.ldexp(torch.ones(exps.shape, dtype=torch.float64), exps)
    err = (deq - w.double().reshape(-1, MXFP4_BLOCK)).abs() / step
    assert err.max().item() <= 2.0


def test_quantize_ties_go_to_the_even_code():
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    rounded = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    w = torch.zeros(MXFP4_BLOCK)
    w[0] = 4.0  # amax 4: scale exponent 0, the values are the grid units
    w[1 : 1 + len(mids)] = torch.tensor(mids)
    w[8 : 8 + len(mids)] = -torch.tensor(mids)
    w[15], w[16], w[17] = 5.9, -6.5, 0.1  # amax 6.5 < 8: exponent still 0; 6.5 saturates to 6
    got = dequantize_mxfp4(*quantize_mxfp4(w[None]), dtype=torch.float32)[0]
    assert got[1 : 1 + len(mids)].tolist() == rounded
    assert got[8 : 8 + len(mids)].tolist() == [-r for r in rounded]
    assert (got[15].item(), got[16].item(), got[17].item()) == (6.0, -6.0, 0.0)
    w[16] = -8.0  # amax 8: exponent 1, the grid doubles (0.75 -> 0.375 units -> 0.5 units = 1.0)
    got = dequantize_mxfp4(*quantize_mxfp4(w[None]), dtype=torch.float32)[0]
    assert (got[16].item(), got[2].item(), got[1].item()) == (-8.0, 1.0, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_representable_values_round_trip_exactly(dtype):
    g = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, 256, (4, 6, 3, 16), dtype=torch.uint8, generator=g)
    # scales whose largest value 6 * 2**(s - 127) stays finite in fp32/bf16 (2**128 overflows)
    scales = torch.randint(0, 253, (4, 6, 3), dtype=torch.uint8, generator=g)
    scales.view(-1)[:2] = torch.tensor([0, 252], dtype=torch.uint8)
    values = dequantize_mxfp4(blocks, scales, dtype)
    again_blocks, again_scales = quantize_mxfp4(values)
    assert torch.equal(_bits(dequantize_mxfp4(again_blocks, again_scales, dtype)), _bits(values))
    # where a block's largest magnitude is 4 or 6 (code >= 6), the encoding itself is the same
    codes = torch.stack([blocks & 0x7, (blocks >> 4) & 0x7], dim=-1).amax(dim=(-1, -2))  # [4, 6, 3]
    same = codes >= 6
    assert same.any()
    assert torch.equal(again_scales[same], scales[same])
    assert torch.equal(again_blocks[same], blocks[same])


def test_quantize_chunks_agree():
    w = torch.randn(5, 7, 96, generator=torch.Generator().manual_seed(3))
    whole = quantize_mxfp4(w)
    for got, want in zip(quantize_mxfp4(w, rows_per_chunk=4), whole):
        assert torch.equal(got, want)


# ---- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("blocks,scales,match", [
    (torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8), "does not match"),
    (torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 3, 1, dtype=torch.uint8), "does not match"),
    (torch.zeros(2, 3, 8, dtype=torch.uint8), torch.zeros(2, 3, dtype=torch.uint8), r"\[\.\.\., G, 16\]"),
    (torch.zeros(16, dtype=torch.uint8), torch.zeros((), dtype=torch.uint8), r"\[\.\.\., G, 16\]"),
    (torch.zeros(2, 3, 16, dtype=torch.int8), torch.zeros(2, 3, dtype=torch.uint8), "blocks must be a uint8"),
    (torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 3, dtype=torch.int32), "scales must be a uint8"),
    (torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 3), "scales must be a uint8"),
    (torch.zeros(2, 3, 16, dtype=torch.uint8), torch.full((2, 3), 255, dtype=torch.uint8), "NaN"),
])
def test_dequantize_refuses_what_is_not_mxfp4(blocks, scales, match):
    with pytest.raises(CheckpointError, match=match):
        dequantize_mxfp4(blocks, scales)


def test_dequantize_bad_arguments():
    b, s = torch.zeros(1, 16, dtype=torch.uint8), torch.zeros(1, dtype=torch.uint8)
    with pytest.raises(ValueError, match="floating-point"):
        dequantize_mxfp4(b, s, torch.int32)
    with pytest.raises(ValueError, match="rows_per_chunk"):
        dequantize_mxfp4(b, s, rows_per_chunk=0)


@pytest.mark.parametrize("w,match", [
    (torch.zeros(4, 48), "multiple of 32"),
    (torch.zeros(()), "multiple of 32"),
    (torch.zeros(4, 32, dtype=torch.int32), "floating-point"),
    (torch.tensor([float("nan")] + [0.0] * 31), "finite"),
    (torch.tensor([float("inf")] + [0.0] * 31), "finite"),
])
def test_quantize_refuses_bad_input(w, match):
    with pytest.raises(ValueError, match=match):
        quantize_mxfp4(w)
