"""The FP8 expert kernels on the CPU, in Triton's interpreter (``TRITON_INTERPRET=1``), on tiny shapes.

The quantizer bit for bit against ``moetrt.fp8.quantize_fp8_blocks`` (torch's casts) for per-token
and per-block groups, wide-range rows, zero rows and masked columns; ``e4m3_rne`` against the
NumPy reference over every code and every rounding midpoint; ``sparse_moe_fp8_triton`` against
the float64 NumPy reference from the same bytes (``sparse_moe_fp8_reference``) for both weight
and both activation scale layouts, partial edge blocks, several M blocks per expert, the config
table's decode and prefill rows, T = 0, bf16 activations, and against the fp32 experts (the
quantization error itself). The interpreter runs Triton 3.6's e4m3 ``tl.dot`` exactly (it widens
the tiles to fp16); its fp32 -> e4m3 cast is not round-to-nearest-even, which the quantizer's
``EMULATE_RNE`` branch covers (see ``sparse_moe_fp8_triton``).

The interpreter mode is fixed when triton is imported: when this process already imported triton
compiled, the whole file reruns in a fresh process.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from moetrt.fp8 import (
    FP8_DTYPE,
    e4m3_from_float32,
    e4m3_to_float32,
    quantize_fp8_blocks,
    sparse_moe_fp8_reference,
    sparse_moe_fp8_torch,
    weight_block,
)
from moetrt.ops.kernels import triton_mode
from moetrt.ops.sparse_moe import sparse_moe_reference

if importlib.util.find_spec("triton") is None:
    pytest.skip(reason="triton is not installed (pip install moetrt[gpu])", allow_module_level=True)
if triton_mode() is None:
    os.environ["TRITON_INTERPRET"] = "1"  # before the first import of triton
IN_PROCESS = triton_mode() != "compiled"
in_process = pytest.mark.skipif(not IN_PROCESS, reason="triton is compiled here: test_rerun_in_interpreter runs this file")

if IN_PROCESS:
    import triton
    import triton.language as tl

    from moetrt.ops.kernels.configs import GemmConfig, SparseMoEConfig
    from moetrt.ops.kernels.sparse_moe_fp8_triton import e4m3_rne, fp8_quantize_triton, sparse_moe_fp8_triton

    @triton.jit
    def _round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, e4m3_rne(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)

# (tokens T, model dim D, expert dim F, experts E, k, weight scales, activation scales, scale block);
# D = 200 / F = 96 leave partial last column blocks, F = 48 a partial row block of gate|up's up rows
MOE_CASES = [
    (13, 96, 64, 6, 2, "block", "token", (32, 32)),
    (7, 200, 96, 5, 3, "block", "block", (64, 64)),
    (9, 96, 64, 4, 2, "channel", "token", (128, 128)),
    (11, 64, 48, 8, 2, "channel", "block", (32, 32)),
    (40, 64, 64, 3, 2, "block", "token", (32, 64)),  # ~27 rows per expert: two 16-row blocks each
]
# NOTE: the kernels and the reference take the same e4m3 bytes and float32 scales; the products are
# exact in both, and the kernels sum each K tile's products in float32 (<= 200 terms) and round h
# (float32 here) before quantizing it. A float32 sum that lands on the other side of an e4m3
# rounding boundary of h moves that element by one e4m3 step (2^-4 relative) times its down weight:
# rare, and small in the relative Frobenius norm of y.
FP8_KERNEL_RTOL = 1e-4
# NOTE: the FP8 experts against the fp32 experts (the quantization error itself, not a kernel error):
# e4m3 keeps 3 mantissa bits (2^-4 relative rounding) on x, both weights and h; four roundings of
# unit-variance data, partly averaging out over the sums: ~3-5% relative Frobenius error.
FP8_VS_FP32_RTOL = 0.08
# NOTE: bf16 x and h (3 bf16 roundings, truncated in the interpreter: 2^-8 each) on top of the FP8 error
BF16_RTOL = 3e-2


def _rel_fro(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


def _problem(tokens, dim, ffn, experts, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=g)
    w_gate_up = torch.randn(experts, 2 * ffn, dim, generator=g) * dim**-0.5
    w_down = torch.randn(experts, dim, ffn, generator=g) * ffn**-0.5
    scores = torch.softmax(torch.randn(tokens, experts, generator=g), -1)
    weights, indices = scores.topk(k)
    return x, weights, indices.to(torch.int32), w_gate_up, w_down


def _quantized(w_gate_up, w_down, weight_scales, block):
    gate_up_block = weight_block(weight_scales, tuple(w_gate_up.shape), block)
    down_block = weight_block(weight_scales, tuple(w_down.shape), block)
    return (*quantize_fp8_blocks(w_gate_up, gate_up_block), *quantize_fp8_blocks(w_down, down_block), gate_up_block,
            down_block)


def _codes(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.uint8).numpy()


@in_process
@pytest.mark.parametrize("group", [200, 128, 64, 32])
def test_quantizer_is_bit_exact(group):
    g = torch.Generator().manual_seed(group)
    # rows spanning 2^-20 .. 2^12 (subnormal codes in every row), a zero row, 37 rows: several programs
    x = torch.randn(37, 200, generator=g) * torch.exp2(torch.randint(-20, 12, (37, 1), generator=g).float())
    x[5] = 0.0
    x[6, :3] = torch.tensor([1.0, -1e-7, 1e-7])  # round to -0.0 (0x80) and +0.0
    q, s = fp8_quantize_triton(x, group)
    ref_q, ref_s = quantize_fp8_blocks(x, (1, group))
    assert np.array_equal(_codes(q), _codes(ref_q))
    assert torch.equal(s, ref_s)
    assert (_codes(q)[:, :] & 0x7F).max() == 0x7E  # every group's amax lands on 448


@in_process
def test_e4m3_rne_matches_reference_at_every_midpoint():
    values = e4m3_to_float32(np.arange(256, dtype=np.uint8))
    finite = np.unique(np.abs(values[~np.isnan(values)]))
    mids = ((finite[1:].astype(np.float64) + finite[:-1]) / 2).astype(np.float32)
    probe = np.concatenate([finite, mids, np.nextafter(mids, 0), np.nextafter(mids, 1e9), [464, 500, 1e6, 2.0**-11]])
    probe = np.concatenate([probe, -probe]).astype(np.float32)
    out = torch.empty(probe.size)
    _round_kernel[(triton.cdiv(probe.size, 256),)](torch.from_numpy(probe), out, probe.size, BLOCK=256)
    expected = e4m3_to_float32(e4m3_from_float32(probe))
    assert np.array_equal(out.numpy().view(np.uint32), expected.view(np.uint32))  # -0.0 kept


@in_process
@pytest.mark.parametrize("case", MOE_CASES, ids=lambda c: f"T{c[0]}-D{c[1]}-F{c[2]}-{c[5]}-{c[6]}-{c[7][0]}x{c[7][1]}")
def test_sparse_moe_fp8_matches_reference(case):
    tokens, dim, ffn, experts, k, weight_scales, activation_scales, block = case
    x, weights, indices, w_gate_up, w_down = _problem(tokens, dim, ffn, experts, k, seed=tokens)
    wgu, sgu, wd, sd, gub, db = _quantized(w_gate_up, w_down, weight_scales, block)
    small = SparseMoEConfig(16, gate_up=GemmConfig(32, 32), down=GemmConfig(32, 32), combine_block_d=32)
    y = sparse_moe_fp8_triton(x, weights, indices, wgu, sgu, wd, sd, gub, db, activation_scales, block, config=small)
    ref = sparse_moe_fp8_reference(x.numpy(), weights.numpy(), indices.numpy(), _codes(wgu), sgu.numpy(), _codes(wd),
                                   sd.numpy(), gub, db, activation_scales, block)
    assert _rel_fro(y.numpy(), ref) <= FP8_KERNEL_RTOL
    emulated = sparse_moe_fp8_torch(x, weights, indices, wgu, sgu, wd, sd, gub, db, activation_scales, block)
    assert _rel_fro(emulated.numpy(), ref) <= FP8_KERNEL_RTOL  # the CPU face of FP8Experts: the same arithmetic
    fp32 = sparse_moe_reference(x.double().numpy(), weights.numpy(), indices.numpy(), w_gate_up.double().numpy(),
                                w_down.double().numpy())
    err = _rel_fro(y.numpy(), fp32)
    assert 1e-3 < err <= FP8_VS_FP32_RTOL, err  # really quantized, and no more than e4m3 costs


@in_process
@pytest.mark.parametrize("tokens", [3, 300], ids=["decode-row", "prefill-row"])
def test_config_table_rows(tokens):
    # the table's own tiles (16-row blocks at T=3, 128-row blocks at T*k/E > 256) with 128-column scale blocks
    x, weights, indices, w_gate_up, w_down = _problem(tokens, 128, 128, 2, 2, seed=1)
    wgu, sgu, wd, sd, gub, db = _quantized(w_gate_up, w_down, "block", (128, 128))
    y = sparse_moe_fp8_triton(x, weights, indices, wgu, sgu, wd, sd, gub, db)
    ref = sparse_moe_fp8_reference(x.numpy(), weights.numpy(), indices.numpy(), _codes(wgu), sgu.numpy(), _codes(wd),
                                   sd.numpy(), gub, db)
    assert _rel_fro(y.numpy(), ref) <= FP8_KERNEL_RTOL


@in_process
def test_bf16_activations_and_empty_batch():
    x, weights, indices, w_gate_up, w_down = _problem(9, 64, 64, 4, 2, seed=3)
    wgu, sgu, wd, sd, gub, db = _quantized(w_gate_up, w_down, "block", (32, 32))
    xb = x.to(torch.bfloat16)
    y = sparse_moe_fp8_triton(xb, weights, indices, wgu, sgu, wd, sd, gub, db)
    assert y.dtype == torch.bfloat16
    ref = sparse_moe_fp8_reference(xb.float().numpy(), weights.numpy(), indices.numpy(), _codes(wgu), sgu.numpy(),
                                   _codes(wd), sd.numpy(), gub, db)
    assert _rel_fro(y.float().numpy(), ref) <= BF16_RTOL
    empty = sparse_moe_fp8_triton(x[:0], weights[:0], indices[:0], wgu, sgu, wd, sd, gub, db)
    assert empty.shape == (0, 64)


@in_process
def test_refuses_what_it_cannot_run():
    x, weights, indices, w_gate_up, w_down = _problem(3, 64, 64, 4, 2, seed=4)
    wgu, sgu, wd, sd, gub, db = _quantized(w_gate_up, w_down, "block", (16, 16))
    with pytest.raises(ValueError, match="multiple of 32 columns"):
        sparse_moe_fp8_triton(x, weights, indices, wgu, sgu, wd, sd, gub, db)
    wgu, sgu, wd, sd, gub, db = _quantized(w_gate_up, w_down, "block", (32, 32))
    with pytest.raises(ValueError, match="w_gate_up must be"):
        sparse_moe_fp8_triton(x, weights, indices, wgu.float(), sgu, wd, sd, gub, db)
    with pytest.raises(ValueError, match="s_down must be float32"):
        sparse_moe_fp8_triton(x, weights, indices, wgu, sgu, wd, sd[:, :1], gub, db)
    with pytest.raises(ValueError, match="activation"):
        sparse_moe_fp8_triton(x, weights, indices, wgu, sgu, wd, sd, gub, db, activation="clamped_swiglu")
    assert wgu.dtype == FP8_DTYPE


# --- when this process runs triton compiled ------------------------------------------------------
@pytest.mark.skipif(IN_PROCESS, reason="triton runs in the interpreter in this process: the tests above ran here")
def test_rerun_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
