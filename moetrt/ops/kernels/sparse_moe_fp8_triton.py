"""Triton kernels of ``moetrt::SparseMoE`` with FP8 e4m3 experts (:mod:`moetrt.fp8` defines the format).

Shape legend as in ``sparse_moe_triton``: T tokens, D model dim, E experts, F expert dim, K routed
experts per token, P = T*K pairs, BM/BN/BK the tiles.

1. ``fp8_quantize_kernel``: ``x [T, D]`` (model dtype) to e4m3 ``xq [T, D]`` and float32
   ``xs [T, ceil(D/GROUP)]``, one scale per row and ``GROUP`` columns (``GROUP = D``: per token;
   128: DeepSeek's per-128-column blocks), the recipe of :func:`moetrt.fp8.quantize_fp8_blocks`:
   ``scale = 448 * (1 / amax)`` (IEEE reciprocal: ``div_rn``), ``q = e4m3(clamp(x * scale))``,
   ``xs = 1 / scale``.
2. align by expert: ``sparse_moe_triton.moe_align`` (the same ``sorted_ids``/``expert_ids``).
3. ``moe_gate_up_fp8_kernel``: per block, ``xq[tokens] @ w_gate_up[e]^T`` on FP8 tensor cores, one
   ``tl.dot`` per K tile (``BLOCK_K`` divides every scale block narrower than its row, so a tile has
   one activation scale per row and one weight scale per column); each tile's float32 product is
   multiplied by its scales and added to a float32 accumulator (DeepSeek-V3's promotion every 128
   columns, which also keeps Hopper's reduced-precision FP8 accumulation to one tile), then the
   activation epilogue, written as ``h [P, F]`` in the model dtype.
4. ``fp8_quantize_kernel`` on ``h``, per (token, slot) row.
5. ``moe_down_fp8_kernel``: ``hq[pairs] @ w_down[e]^T`` the same way, times the routing weight, into
   per-slot outputs ``[P, D]`` in the model dtype; 6. ``moe_combine_kernel`` sums the slots.

Weight scales are ``[E, ceil(N/W_BN), ceil(K/W_BK)]`` float32 (the checkpoints' ``weight_scale_inv``):
``(W_BN, W_BK) = (128, 128)`` blocks, or ``(1, K)`` per output channel.

In Triton's interpreter (Triton 3.6) ``tl.dot`` of e4m3 tiles is exact (it widens them to fp16),
but the float32 -> e4m3 cast neither rounds to nearest even nor carries a rounded-up mantissa into
the exponent (124.17 becomes 64, not 128); there the quantizer rounds with :func:`e4m3_rne` first,
whose values the cast then converts exactly. Compiled, the cast is the hardware's
``cvt.rn.satfinite``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moetrt.fp8 import DEFAULT_BLOCK, FP8_DTYPE, activation_block, check_fp8_experts
from moetrt.ops.kernels._util import check_device, interpreting
from moetrt.ops.kernels.configs import SparseMoEConfig, fp8_block_k, next_power_of_2, sparse_moe_fp8_config
from moetrt.ops.kernels.sparse_moe_triton import (
    activation_epilogue,
    expert_tile,
    load_a,
    load_b,
    moe_align,
    moe_combine_kernel,
    tile_ids,
)

__all__ = [
    "sparse_moe_fp8_triton",
    "fp8_quantize_triton",
    "fp8_quantize_kernel",
    "moe_gate_up_fp8_kernel",
    "moe_down_fp8_kernel",
    "e4m3_rne",
    "FP8_ACTIVATIONS",
]

FP8_ACTIVATIONS = ("silu", "gelu_tanh")  # the activations the FP8 kernels implement (no biases)


@triton.jit
def e4m3_rne(v):
    """fp32 ``v`` rounded to the nearest e4m3 value (ties to even, saturating at ±448), still fp32.

    ``ulp = 2^(max(floor(log2|v|), -6) - 3)``; ``|v| / ulp`` is exact and below 2^5, so adding and
    subtracting 1.5 * 2^23 rounds it to an integer, half to even, in fp32 arithmetic.
    """
    a = tl.minimum(tl.abs(v), 448.0)
    exponent = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # floor(log2 a), >= -6
    ulp = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inv_ulp = ((127 - exponent + 3) << 23).to(tl.float32, bitcast=True)
    rounded = ((a * inv_ulp + 12582912.0) - 12582912.0) * ulp
    sign = v.to(tl.int32, bitcast=True) & -2147483648  # v's sign bit (-0.0 stays -0.0; Triton's -x is 0 - x)
    return (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def fp8_quantize_kernel(
    x_ptr,  # [R, K] model dtype
    q_ptr,  # [R, K] float8e4nv out
    s_ptr,  # [R, ceil(K/GROUP)] float32 out: 1 / scale per row and group
    num_rows,  # R
    K: tl.constexpr,
    GROUP: tl.constexpr,  # columns per scale
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,  # columns per step, a power of two
    EMULATE_RNE: tl.constexpr,  # round with e4m3_rne before the cast (the interpreter's cast is wrong)
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    group = tl.program_id(1)
    r_ok = rows < num_rows
    base = rows.to(tl.int64)[:, None] * K  # [BR, 1]
    amax = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, GROUP, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        cols = group * GROUP + offs
        ok = r_ok[:, None] & ((offs < GROUP) & (cols < K))[None, :]
        v = tl.load(x_ptr + base + cols[None, :], mask=ok, other=0.0).to(tl.float32)  # [BR, BC]
        amax = tl.maximum(amax, tl.max(tl.abs(v), axis=1))
    nonzero = amax > 0
    one = tl.full((BLOCK_R,), 1.0, tl.float32)
    scale = tl.where(nonzero, 448.0 * tl.math.div_rn(one, tl.where(nonzero, amax, one)), one)  # [BR]
    tl.store(s_ptr + rows * tl.cdiv(K, GROUP) + group, tl.math.div_rn(one, scale), mask=r_ok)
    for c0 in range(0, GROUP, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        cols = group * GROUP + offs
        ok = r_ok[:, None] & ((offs < GROUP) & (cols < K))[None, :]
        v = tl.load(x_ptr + base + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum(v * scale[:, None], -448.0), 448.0)
        if EMULATE_RNE:
            v = e4m3_rne(v)
        tl.store(q_ptr + base + cols[None, :], v.to(tl.float8e4nv), mask=ok)


@triton.jit
def moe_gate_up_fp8_kernel(
    xq_ptr,  # [T, D] float8e4nv
    xs_ptr,  # [T, X_SCALES] float32
    w_ptr,  # [E, 2F, D] float8e4nv: gate rows, then up rows
    ws_ptr,  # [E, cdiv(2F, W_BN), W_SCALES] float32
    h_ptr,  # [P, F] out, model dtype
    sorted_ids_ptr,  # [max_blocks * BLOCK_M] int32
    expert_ids_ptr,  # [max_blocks] int32
    num_padded_ptr,  # [1] int32
    num_pairs,  # P
    D: tl.constexpr,
    F: tl.constexpr,
    K: tl.constexpr,  # routed experts per token
    X_GROUP: tl.constexpr,  # columns per activation scale
    W_BN: tl.constexpr,  # rows per weight scale
    W_BK: tl.constexpr,  # columns per weight scale
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # divides X_GROUP and W_BK where they are narrower than D
    GROUP_M: tl.constexpr,
    ACTIVATION: tl.constexpr = "silu",
):
    pid_m, pid_n = tile_ids(GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    X_SCALES: tl.constexpr = (D + X_GROUP - 1) // X_GROUP
    W_SCALES: tl.constexpr = (D + W_BK - 1) // W_BK
    pairs, row_ok, expert, offs_n, n_ok = expert_tile(
        sorted_ids_ptr, expert_ids_ptr, num_pairs, pid_m, pid_n, F, BLOCK_M, BLOCK_N)  # offs_n: columns of h
    tokens = (pairs // K).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = xq_ptr + tokens[:, None] * D + offs_k[None, :]  # [BM, BK]
    gate_ptrs = w_ptr + expert * (2 * F * D) + offs_n[None, :].to(tl.int64) * D + offs_k[:, None]  # [BK, BN]
    up_ptrs = gate_ptrs + F * D
    xs_ptrs = xs_ptr + tokens * X_SCALES  # [BM]
    ws_base = ws_ptr + expert * (((2 * F + W_BN - 1) // W_BN) * W_SCALES)
    gate_s_ptrs = ws_base + (offs_n // W_BN) * W_SCALES  # [BN]
    up_s_ptrs = ws_base + ((F + offs_n) // W_BN) * W_SCALES
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        a = load_a(x_ptrs, row_ok, offs_k, D - k0, D % BLOCK_K == 0)
        b_gate = load_b(gate_ptrs, n_ok, offs_k, D - k0, D % BLOCK_K == 0)
        b_up = load_b(up_ptrs, n_ok, offs_k, D - k0, D % BLOCK_K == 0)
        sx = tl.load(xs_ptrs + k0 // X_GROUP, mask=row_ok, other=0.0)  # [BM] this tile's activation scales
        s_gate = tl.load(gate_s_ptrs + k0 // W_BK, mask=n_ok, other=0.0)  # [BN] its weight scales
        s_up = tl.load(up_s_ptrs + k0 // W_BK, mask=n_ok, other=0.0)
        acc_gate += tl.dot(a, b_gate) * (sx[:, None] * s_gate[None, :])
        acc_up += tl.dot(a, b_up) * (sx[:, None] * s_up[None, :])
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K

    h = activation_epilogue(acc_gate, acc_up, None, None, ACTIVATION)  # [BM, BN] fp32
    h_ptrs = h_ptr + pairs[:, None].to(tl.int64) * F + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def moe_down_fp8_kernel(
    hq_ptr,  # [P, F] float8e4nv
    hs_ptr,  # [P, H_SCALES] float32
    w_ptr,  # [E, D, F] float8e4nv
    ws_ptr,  # [E, cdiv(D, W_BN), W_SCALES] float32
    out_ptr,  # [P, D] out, model dtype: routing weight * expert output per pair
    routing_ptr,  # [P] float32
    sorted_ids_ptr,
    expert_ids_ptr,
    num_padded_ptr,
    num_pairs,
    D: tl.constexpr,
    F: tl.constexpr,
    H_GROUP: tl.constexpr,  # columns per activation scale of h
    W_BN: tl.constexpr,
    W_BK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = tile_ids(GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    H_SCALES: tl.constexpr = (F + H_GROUP - 1) // H_GROUP
    W_SCALES: tl.constexpr = (F + W_BK - 1) // W_BK
    pairs, row_ok, expert, offs_n, n_ok = expert_tile(
        sorted_ids_ptr, expert_ids_ptr, num_pairs, pid_m, pid_n, D, BLOCK_M, BLOCK_N)  # offs_n: output columns
    rows = pairs.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = hq_ptr + rows[:, None] * F + offs_k[None, :]  # [BM, BK]
    b_ptrs = w_ptr + expert * (D * F) + offs_n[None, :].to(tl.int64) * F + offs_k[:, None]  # [BK, BN]
    hs_ptrs = hs_ptr + rows * H_SCALES  # [BM]
    ws_ptrs = ws_ptr + expert * (((D + W_BN - 1) // W_BN) * W_SCALES) + (offs_n // W_BN) * W_SCALES  # [BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        a = load_a(a_ptrs, row_ok, offs_k, F - k0, F % BLOCK_K == 0)
        b = load_b(b_ptrs, n_ok, offs_k, F - k0, F % BLOCK_K == 0)
        sh = tl.load(hs_ptrs + k0 // H_GROUP, mask=row_ok, other=0.0)  # [BM]
        sw = tl.load(ws_ptrs + k0 // W_BK, mask=n_ok, other=0.0)  # [BN]
        acc += tl.dot(a, b) * (sh[:, None] * sw[None, :])
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    routing = tl.load(routing_ptr + rows, mask=row_ok, other=0.0)  # [BM] fp32
    out = acc * routing[:, None]
    tl.store(
        out_ptr + rows[:, None] * D + offs_n[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & n_ok[None, :],
    )


def fp8_quantize_blocks(group: int) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_C, num_warps)`` of the quantizer for scale groups of ``group`` columns."""
    block_c = min(next_power_of_2(group), 1024)
    return max(1, 2048 // block_c), block_c, 4


def fp8_quantize_triton(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [R, K] float8_e4m3fn, scale_inv [R, ceil(K/group)] float32)`` of ``x [R, K]``: bit for bit
    ``moetrt.fp8.quantize_fp8_blocks(x.float(), (1, group))``."""
    check_device(x)
    rows, cols = x.shape
    x = x.contiguous()
    q = torch.empty(rows, cols, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(rows, triton.cdiv(cols, group), dtype=torch.float32, device=x.device)
    if rows == 0 or cols == 0:
        return q, s
    block_r, block_c, num_warps = fp8_quantize_blocks(group)
    fp8_quantize_kernel[(triton.cdiv(rows, block_r), triton.cdiv(cols, group))](
        x, q, s, rows, K=cols, GROUP=group, BLOCK_R=block_r, BLOCK_C=block_c, EMULATE_RNE=interpreting(),
        num_warps=num_warps,
    )  # fmt: skip
    return q, s


def sparse_moe_fp8_triton(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    w_gate_up: torch.Tensor,
    s_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    s_down: torch.Tensor,
    gate_up_block: tuple[int, int],
    down_block: tuple[int, int],
    activation_scales: str = "token",
    block: tuple[int, int] = DEFAULT_BLOCK,
    activation: str = "silu",
    *,
    config: SparseMoEConfig | None = None,
    align: str = "auto",
) -> torch.Tensor:
    """``moetrt::SparseMoE`` with FP8 e4m3 experts: ``y [T, D]`` in x's dtype (bf16, fp16 or fp32).

    ``w_gate_up [E, 2F, D]`` / ``w_down [E, D, F]`` float8_e4m3fn with float32 scales in
    ``gate_up_block`` / ``down_block`` (:func:`moetrt.fp8.weight_block`); activations quantized per
    token or per ``block[1]`` columns (``activation_scales``). ``config`` overrides the tiles (its
    ``block_k`` must be :func:`configs.fp8_block_k` of the scale blocks or a divisor of it).
    """
    check_fp8_experts("sparse_moe_fp8_triton", w_gate_up, s_gate_up, w_down, s_down, gate_up_block, down_block,
                      activation_scales)
    if x.dim() != 2 or x.shape[1] != w_gate_up.shape[2]:
        raise ValueError(f"sparse_moe_fp8_triton: x must be [T, D={w_gate_up.shape[2]}], got {list(x.shape)}")
    if activation not in FP8_ACTIVATIONS:
        raise ValueError(f"FP8 experts implement activation {FP8_ACTIVATIONS}, got {activation!r}")
    check_device(x, weights, indices, w_gate_up, s_gate_up, w_down, s_down)
    num_tokens, dim = x.shape
    num_experts, ffn = w_gate_up.shape[0], w_down.shape[2]
    k = indices.shape[1]
    y = torch.empty_like(x)
    if num_tokens == 0 or k == 0:
        return y.zero_()
    x_group = activation_block(activation_scales, dim, block)[1]
    h_group = activation_block(activation_scales, ffn, block)[1]
    # the K tile lies inside every scale block narrower than its row
    narrow = [c for c, row in ((x_group, dim), (gate_up_block[1], dim), (h_group, ffn), (down_block[1], ffn)) if c < row]
    block_k = fp8_block_k(*narrow)
    config = config or sparse_moe_fp8_config(num_tokens, num_experts, k, block_k)
    for cfg in (config.gate_up, config.down):
        if block_k % cfg.block_k:
            raise ValueError(f"config block_k {cfg.block_k} must divide the FP8 scale blocks' K tile {block_k}")
    num_pairs = num_tokens * k
    indices = indices.contiguous()
    routing = weights.contiguous().view(-1).float()  # [P]
    w_gate_up, s_gate_up = w_gate_up.contiguous(), s_gate_up.contiguous()
    w_down, s_down = w_down.contiguous(), s_down.contiguous()

    xq, xs = fp8_quantize_triton(x, x_group)  # [T, D] e4m3, [T, cdiv(D, x_group)]
    sorted_ids, expert_ids, num_padded = moe_align(indices, num_experts, config.block_m, align)
    max_blocks = expert_ids.numel()
    h = torch.empty(num_pairs, ffn, dtype=x.dtype, device=x.device)  # [P, F]
    cfg = config.gate_up
    moe_gate_up_fp8_kernel[(max_blocks, triton.cdiv(ffn, cfg.block_n))](
        xq, xs, w_gate_up, s_gate_up, h, sorted_ids, expert_ids, num_padded, num_pairs,
        D=dim, F=ffn, K=k, X_GROUP=x_group, W_BN=gate_up_block[0], W_BK=gate_up_block[1],
        BLOCK_M=config.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, ACTIVATION=activation,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    hq, hs = fp8_quantize_triton(h, h_group)  # [P, F] e4m3, [P, cdiv(F, h_group)]
    slots = torch.empty(num_pairs, dim, dtype=x.dtype, device=x.device)  # [P, D]
    cfg = config.down
    moe_down_fp8_kernel[(max_blocks, triton.cdiv(dim, cfg.block_n))](
        hq, hs, w_down, s_down, slots, routing, sorted_ids, expert_ids, num_padded, num_pairs,
        D=dim, F=ffn, H_GROUP=h_group, W_BN=down_block[0], W_BK=down_block[1],
        BLOCK_M=config.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    block_d = min(config.combine_block_d, next_power_of_2(dim))
    moe_combine_kernel[(num_tokens, triton.cdiv(dim, block_d))](
        slots, indices, y, num_experts, D=dim, K=k, BLOCK_D=block_d, num_warps=4 if block_d >= 512 else 1,
    )  # fmt: skip
    return y
