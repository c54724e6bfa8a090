"""Triton kernels of ``moetrt::SparseMoE``: align by expert, two grouped GEMMs, combine.

Shape legend: T tokens, D model dim, E experts, F expert dim, K routed experts per token,
P = T*K (token, slot) pairs (pair ``p`` is token ``p // K``, slot ``p % K``), BM the M tile.

1. align (``moe_align``): the pairs are grouped by expert, each expert's group padded to a
   multiple of BM (as vLLM's and SGLang's ``moe_align_block_size``), giving ``sorted_ids``
   (pair per slot, ``P`` marks padding), ``expert_ids`` (expert per block of BM slots) and
   ``num_padded`` (slots in use, on the device: the grid is sized from T alone and blocks past
   ``num_padded`` exit at once, so nothing waits for the host and a CUDA graph can capture it).
2. gate|up (``moe_gate_up_kernel``): per block, ``x[tokens] @ w_gate_up[e]^T`` into two fp32
   accumulators (gate rows, up rows), plus the optional bias ``b_gate_up[e]``, then the
   activation epilogue, written as the intermediate ``h [P, F]`` in the model dtype:
   ``silu(gate) * up`` (SwiGLU), or gpt-oss's ``clamped_swiglu``: ``gate = min(gate, limit)``,
   ``up = clamp(up, -limit, limit)``, ``(up + 1) * gate * sigmoid(alpha * gate)``, or Gemma 4's
   ``gelu_tanh``: ``gelu_tanh(gate) * up``.
3. down (``moe_down_kernel``): ``h[pairs] @ w_down[e]^T`` in fp32, plus the optional bias
   ``b_down[e]``, times the pair's routing weight (fp32), cast to the model dtype into per-slot
   outputs ``[P, D] = [T, K, D]``.
   With ``weight_input`` (Llama 4) the routing weight scales the pair's gate|up accumulators
   instead (``(w x) W = w (x W)``, before the bias; fp32) and the down step leaves it out.
4. combine (``moe_combine_kernel``): ``y[t] = sum_j slots[t, j]`` in fp32, in slot order:
   deterministic, no atomics.

Inputs may be bf16, fp16 or fp32 (x, the weights and the biases in one dtype); accumulation,
bias addition and the activation are fp32. Block sizes come from ``configs.sparse_moe_config``
unless a ``SparseMoEConfig`` is passed.

Variants are compile-time: an absent bias is passed as ``None`` (Triton specialises it away) and
``ACTIVATION`` is a ``tl.constexpr``, so the SwiGLU kernels without biases are the same compiled
code as before either existed; ``alpha`` and ``limit`` are run-time floats of the clamped
variant (``None`` for SwiGLU), so every gpt-oss layer shares one compiled kernel.

Indices outside ``0..E-1`` are not checked (checking would wait for the host); their pairs are
dropped and contribute nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moetrt.ops.kernels._util import check_device, interpreting
from moetrt.ops.kernels.configs import SparseMoEConfig, next_power_of_2, sparse_moe_config
from moetrt.ops.sparse_moe import SPEC, _check

__all__ = [
    "sparse_moe_triton",
    "moe_align",
    "max_aligned_blocks",
    "align_block_p",
    "tile_ids",
    "moe_align_kernel",
    "moe_gate_up_kernel",
    "moe_down_kernel",
    "moe_combine_kernel",
    "activation_epilogue",
    "expert_tile",
    "load_a",
    "load_b",
]

_DEFAULTS = SPEC.defaults  # activation, alpha, limit as the op declares them


@triton.jit
def moe_align_kernel(
    indices_ptr,  # [P] int32|int64: expert of each pair
    sorted_ids_ptr,  # [max_blocks * BLOCK_M] int32 out: pair per slot, P for padding
    expert_ids_ptr,  # [max_blocks] int32 out: expert per block of BLOCK_M slots
    num_padded_ptr,  # [1] int32 out: slots in use, a multiple of BLOCK_M
    num_pairs,  # P
    num_experts,  # E
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,  # next power of two >= E
    BLOCK_P: tl.constexpr,  # pairs (or slots) handled per step
):
    # One program; the loops are `while` loops because their trip count is a run-time value.
    offs_e = tl.arange(0, BLOCK_E)  # [BE]
    e_ok = offs_e < num_experts

    # 1. pairs per expert (out-of-range experts count nowhere)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    start = 0
    while start < num_pairs:
        offs_p = start + tl.arange(0, BLOCK_P)  # [BP]
        expert = tl.load(indices_ptr + offs_p, mask=offs_p < num_pairs, other=-1)
        hit = (expert[:, None] == offs_e[None, :]) & e_ok[None, :]  # [BP, BE]
        counts += tl.sum(hit.to(tl.int32), axis=0)
        start += BLOCK_P

    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # [BE]
    padded_end = tl.cumsum(padded, axis=0)
    padded_start = padded_end - padded
    total = tl.sum(padded, axis=0)
    tl.store(num_padded_ptr, total)

    # 2. each pair goes to its expert's start + the number of earlier pairs of that expert
    seen = tl.zeros((BLOCK_E,), dtype=tl.int32)
    start = 0
    while start < num_pairs:
        offs_p = start + tl.arange(0, BLOCK_P)
        expert = tl.load(indices_ptr + offs_p, mask=offs_p < num_pairs, other=-1)
        hit = (expert[:, None] == offs_e[None, :]) & e_ok[None, :]  # [BP, BE]
        hits = hit.to(tl.int32)
        before = tl.cumsum(hits, axis=0) - hits  # [BP, BE] earlier pairs of the same expert in this step
        slot = tl.sum(tl.where(hit, padded_start[None, :] + seen[None, :] + before, 0), axis=1)  # [BP]
        tl.store(sorted_ids_ptr + slot, offs_p, mask=tl.sum(hits, axis=1) > 0)
        seen += tl.sum(hits, axis=0)
        start += BLOCK_P

    # 3. padding slots get P; each block start records its expert (slots never overlap step 2's)
    start = 0
    while start < total:
        offs_q = start + tl.arange(0, BLOCK_P)  # [BP] slots
        in_use = offs_q < total
        # the owner of slot q is the number of experts whose padded range ends at or before q
        owner = tl.sum((padded_end[None, :] <= offs_q[:, None]).to(tl.int32), axis=1)  # [BP]
        mine = offs_e[None, :] == owner[:, None]  # [BP, BE]
        owner_start = tl.sum(tl.where(mine, padded_start[None, :], 0), axis=1)
        owner_count = tl.sum(tl.where(mine, counts[None, :], 0), axis=1)
        padding = tl.zeros((BLOCK_P,), dtype=tl.int32) + num_pairs
        tl.store(sorted_ids_ptr + offs_q, padding, mask=in_use & (offs_q - owner_start >= owner_count))
        tl.store(expert_ids_ptr + offs_q // BLOCK_M, owner, mask=in_use & (offs_q % BLOCK_M == 0))
        start += BLOCK_P


@triton.jit
def tile_ids(GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)``: the M block (of aligned slots) and N tile this program computes.

    Programs start in launch order, axis 0 fastest. ``GROUP_M = 0``: program ``(m, n)`` computes
    tile ``(m, n)``, so every M block of one N tile runs before the next N tile (the blocks of one
    expert share that weight tile while it is in L2, and all of ``x`` is re-read per N tile).
    ``GROUP_M = G > 0``: the launch order walks ``G`` M blocks through all N tiles before the next
    ``G`` (Triton's grouped ordering): the rows those ``G`` blocks gather stay in L2 while the
    weight tiles stream past, which pays when ``x`` gathered by every block outgrows L2 (thousands of
    tokens). Every tile is computed exactly once either way; the grid is the same.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if GROUP_M > 0:
        num_m = tl.num_programs(0)
        pid = pid_n * num_m + pid_m  # position in launch order
        per_group = GROUP_M * tl.num_programs(1)
        first_m = (pid // per_group) * GROUP_M
        size = tl.minimum(num_m - first_m, GROUP_M)  # the last group may be short
        pid_m = first_m + (pid % per_group) % size
        pid_n = (pid % per_group) // size
    return pid_m, pid_n


@triton.jit
def expert_tile(sorted_ids_ptr, expert_ids_ptr, num_pairs, pid_m, pid_n, N, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """Tile ``(pid_m, pid_n)`` of a grouped GEMM: its pairs ``[BM]`` (``P`` marks padding), which are real,
    its expert (int64), its output columns ``[BN]`` and which lie inside ``N``."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] slots
    pairs = tl.load(sorted_ids_ptr + offs_m)  # [BM]
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    return pairs, pairs < num_pairs, expert, offs_n, offs_n < N


@triton.jit
def load_a(ptrs, row_ok, offs_k, remaining, EVEN_K: tl.constexpr):
    """An A tile ``[BM, BK]`` of a grouped GEMM: padding rows and (unless ``EVEN_K``) columns past K read as 0."""
    mask = row_ok[:, None]
    if not EVEN_K:
        mask = mask & (offs_k < remaining)[None, :]
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def load_b(ptrs, n_ok, offs_k, remaining, EVEN_K: tl.constexpr):
    """A B tile ``[BK, BN]`` (a weight tile read along K): columns past N and (unless ``EVEN_K``) rows past K read as 0."""
    mask = n_ok[None, :]
    if not EVEN_K:
        mask = (offs_k < remaining)[:, None] & mask
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def activation_epilogue(acc_gate, acc_up, alpha, limit, ACTIVATION: tl.constexpr):
    """``act(gate, up)`` of two fp32 ``[BM, BN]`` accumulators, in fp32 (the gate|up kernels' epilogue)."""
    if ACTIVATION == "clamped_swiglu":
        gate = tl.minimum(acc_gate, limit)
        up = tl.minimum(tl.maximum(acc_up, -limit), limit)
        h = (up + 1.0) * (gate / (1.0 + tl.exp(-alpha * gate)))  # [BM, BN] (up + 1) * gate * sigmoid(alpha * gate)
    elif ACTIVATION == "gelu_tanh":
        # gelu_tanh(gate) * up with tanh(z) = 2 sigmoid(2z) - 1 = 1 - 2 / (1 + exp(2z)), fp32
        z = 0.7978845608028654 * (acc_gate + 0.044715 * acc_gate * acc_gate * acc_gate)
        h = 0.5 * acc_gate * (2.0 - 2.0 / (1.0 + tl.exp(2.0 * z))) * acc_up  # [BM, BN]
    else:
        h = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up  # [BM, BN] silu(gate) * up, fp32
    return h


@triton.jit
def moe_gate_up_kernel(
    x_ptr,  # [T, D]
    w_ptr,  # [E, 2F, D]: gate rows, then up rows
    b_ptr,  # [E, 2F]: gate biases, then up biases; None: no bias
    h_ptr,  # [P, F] out: act(gate, up) per pair
    sorted_ids_ptr,  # [max_blocks * BLOCK_M] int32
    expert_ids_ptr,  # [max_blocks] int32
    num_padded_ptr,  # [1] int32
    num_pairs,  # P
    alpha,  # float32, clamped_swiglu's sigmoid gain; None for silu
    limit,  # float32, clamped_swiglu's clamp; None for silu
    D: tl.constexpr,
    F: tl.constexpr,
    K: tl.constexpr,  # routed experts per token (pair // K is the token)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,  # multiply in fp32 (the interpreter's bf16 dot is wrong, see sparse_moe_triton)
    PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee" keeps fp32 inputs exact
    GROUP_M: tl.constexpr,  # tile order, see tile_ids
    ACTIVATION: tl.constexpr = "silu",  # "silu" | "clamped_swiglu" | "gelu_tanh" (moetrt.ops.sparse_moe.ACTIVATIONS)
    routing_ptr=None,  # [P] float32 routing weights, read with WEIGHT_INPUT only
    WEIGHT_INPUT: tl.constexpr = 0,  # 1: the routing weight scales the expert's input (Llama 4)
):
    pid_m, pid_n = tile_ids(GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    pairs, row_ok, expert, offs_n, n_ok = expert_tile(
        sorted_ids_ptr, expert_ids_ptr, num_pairs, pid_m, pid_n, F, BLOCK_M, BLOCK_N)  # offs_n: columns of h
    tokens = (pairs // K).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + tokens[:, None] * D + offs_k[None, :]  # [BM, BK]
    gate_ptrs = w_ptr + expert * (2 * F * D) + offs_n[None, :].to(tl.int64) * D + offs_k[:, None]  # [BK, BN]
    up_ptrs = gate_ptrs + F * D
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        a = load_a(x_ptrs, row_ok, offs_k, D - k0, D % BLOCK_K == 0)
        b_gate = load_b(gate_ptrs, n_ok, offs_k, D - k0, D % BLOCK_K == 0)
        b_up = load_b(up_ptrs, n_ok, offs_k, D - k0, D % BLOCK_K == 0)
        if UPCAST:
            a, b_gate, b_up = a.to(tl.float32), b_gate.to(tl.float32), b_up.to(tl.float32)
        acc_gate = tl.dot(a, b_gate, acc_gate, input_precision=PRECISION)
        acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K

    if WEIGHT_INPUT:  # (w x) W = w (x W): the pair's weight scales the accumulators, before the bias
        routing = tl.load(routing_ptr + pairs, mask=row_ok, other=0.0)[:, None]  # [BM, 1] fp32
        acc_gate = acc_gate * routing
        acc_up = acc_up * routing
    if b_ptr is not None:  # the expert's gate and up biases, added in fp32
        bias_ptrs = b_ptr + expert * (2 * F) + offs_n  # [BN]
        acc_gate += tl.load(bias_ptrs, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc_up += tl.load(bias_ptrs + F, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    h = activation_epilogue(acc_gate, acc_up, alpha, limit, ACTIVATION)  # [BM, BN] fp32
    h_ptrs = h_ptr + pairs[:, None].to(tl.int64) * F + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def moe_down_kernel(
    h_ptr,  # [P, F]
    w_ptr,  # [E, D, F]
    b_ptr,  # [E, D] bias of the down projection; None: no bias
    out_ptr,  # [P, D] out: routing weight * expert output per pair
    routing_ptr,  # [P] float32 routing weights
    sorted_ids_ptr,  # [max_blocks * BLOCK_M] int32
    expert_ids_ptr,  # [max_blocks] int32
    num_padded_ptr,  # [1] int32
    num_pairs,  # P
    D: tl.constexpr,
    F: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    GROUP_M: tl.constexpr,  # tile order, see tile_ids
    WEIGHT_INPUT: tl.constexpr = 0,  # 1: the gate|up step applied the routing weight; none here
):
    pid_m, pid_n = tile_ids(GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    pairs, row_ok, expert, offs_n, n_ok = expert_tile(
        sorted_ids_ptr, expert_ids_ptr, num_pairs, pid_m, pid_n, D, BLOCK_M, BLOCK_N)  # offs_n: output columns
    rows = pairs.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = h_ptr + rows[:, None] * F + offs_k[None, :]  # [BM, BK]
    b_ptrs = w_ptr + expert * (D * F) + offs_n[None, :].to(tl.int64) * F + offs_k[:, None]  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        a = load_a(a_ptrs, row_ok, offs_k, F - k0, F % BLOCK_K == 0)
        b = load_b(b_ptrs, n_ok, offs_k, F - k0, F % BLOCK_K == 0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    if b_ptr is not None:  # the expert's output bias, added in fp32 before the routing weight
        acc += tl.load(b_ptr + expert * D + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if WEIGHT_INPUT:
        out = acc
    else:
        routing = tl.load(routing_ptr + rows, mask=row_ok, other=0.0)  # [BM] fp32
        out = acc * routing[:, None]  # the routing weight multiplies in fp32, then one cast
    tl.store(
        out_ptr + rows[:, None] * D + offs_n[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & n_ok[None, :],
    )


@triton.jit
def moe_combine_kernel(
    slots_ptr,  # [T, K, D] per-slot outputs
    indices_ptr,  # [T, K] int32|int64: slots with an out-of-range expert were never written
    y_ptr,  # [T, D] out
    num_experts,  # E
    D: tl.constexpr,
    K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    d_ok = offs_d < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in tl.static_range(K):  # fixed order: the sum is deterministic
        expert = tl.load(indices_ptr + token * K + j)
        part = tl.load(slots_ptr + (token * K + j) * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        acc += tl.where((expert >= 0) & (expert < num_experts), part, 0.0)
    tl.store(y_ptr + token * D + offs_d, acc.to(y_ptr.dtype.element_ty), mask=d_ok)


def max_aligned_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Blocks of ``block_m`` slots the alignment can need: each expert hit pads fewer than ``block_m``."""
    return triton.cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m)


def align_block_p(num_experts: int) -> int:
    """Pairs per step of the alignment kernel: a [BLOCK_P, BLOCK_E] step of about 4096 values."""
    return max(16, min(1024, 4096 // next_power_of_2(num_experts)))


def moe_align(
    indices: torch.Tensor, num_experts: int, block_m: int, method: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the (token, slot) pairs of ``indices [T, K]`` by expert, each group padded to ``block_m``.

    Returns ``sorted_ids`` int32 ``[max_blocks * block_m]`` (pair per slot, ``T*K`` marks padding),
    ``expert_ids`` int32 ``[max_blocks]`` and ``num_padded`` int32 ``[1]``; only the first
    ``num_padded`` slots and ``num_padded / block_m`` blocks are meaningful. Within an expert the
    pairs keep their order. ``method``: ``"triton"`` (one small program, the form the TensorRT
    plugins embed), ``"torch"`` (a stable sort, faster when T*K*E is large) or ``"auto"``.
    """
    if method not in ("auto", "triton", "torch"):
        raise ValueError(f"moe_align: method must be 'auto', 'triton' or 'torch', got {method!r}")
    num_pairs = indices.numel()
    max_blocks = max_aligned_blocks(num_pairs, num_experts, block_m)
    if method == "auto":
        # the one-program kernel walks all pairs x experts serially; past ~1M it loses to a sort
        method = "triton" if num_pairs * next_power_of_2(num_experts) <= 1 << 20 else "torch"
    if method == "torch":
        return _moe_align_torch(indices, num_experts, block_m, max_blocks)
    device = indices.device
    sorted_ids = torch.empty(max_blocks * block_m, dtype=torch.int32, device=device)
    expert_ids = torch.empty(max_blocks, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    moe_align_kernel[(1,)](
        indices.reshape(-1), sorted_ids, expert_ids, num_padded, num_pairs, num_experts,
        BLOCK_M=block_m, BLOCK_E=next_power_of_2(num_experts), BLOCK_P=align_block_p(num_experts),
        num_warps=4,
    )  # fmt: skip
    return sorted_ids, expert_ids, num_padded


def _moe_align_torch(indices, num_experts, block_m, max_blocks):
    device = indices.device
    flat = indices.reshape(-1).long()  # [P]
    num_pairs, max_slots = flat.numel(), max_blocks * block_m
    expert = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)  # [P], bucket E: dropped
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    counts.scatter_add_(0, expert, torch.ones_like(expert))  # [E+1]
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m  # [E]
    padded_end = padded.cumsum(0)  # [E]
    order = torch.argsort(expert, stable=True)  # [P] pairs grouped by expert, in pair order
    sorted_expert = expert[order]
    first = counts.cumsum(0) - counts  # [E+1] first sorted position of each expert
    start = torch.cat((padded_end - padded, padded_end.new_full((1,), max_slots)))  # dropped pairs land past the end
    slot = start[sorted_expert] + torch.arange(num_pairs, device=device) - first[sorted_expert]  # [P]
    sorted_ids = torch.full((max_slots + num_pairs,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, slot, order.to(torch.int32))
    block_starts = torch.arange(max_blocks, device=device) * block_m
    expert_ids = torch.searchsorted(padded_end, block_starts, right=True).clamp_(max=num_experts)
    num_padded = padded_end[-1:] if num_experts else torch.zeros(1, dtype=torch.long, device=device)
    return sorted_ids[:max_slots], expert_ids.to(torch.int32), num_padded.to(torch.int32)


def sparse_moe_triton(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    b_gate_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    activation: str = _DEFAULTS["activation"],
    alpha: float = _DEFAULTS["alpha"],
    limit: float = _DEFAULTS["limit"],
    weight_input: int = _DEFAULTS["weight_input"],
    *,
    config: SparseMoEConfig | None = None,
    align: str = "auto",
) -> torch.Tensor:
    """``moetrt::SparseMoE`` on the Triton kernels: ``y [T, D]`` in x's dtype.

    ``b_gate_up [E, 2F]`` (gate biases, then up biases) and ``b_down [E, D]`` are optional;
    ``alpha`` and ``limit`` apply to ``activation="clamped_swiglu"`` only; ``weight_input=1`` scales
    the experts' inputs by the routing weights instead of their outputs. Runs on CUDA tensors,
    or on CPU tensors when triton runs in its interpreter (``TRITON_INTERPRET=1`` set before
    triton is imported). Nothing here synchronizes with the host, so a CUDA graph can capture it.
    """
    _check(x, weights, indices, w_gate_up, w_down, b_gate_up, b_down, activation, alpha, limit, weight_input)
    check_device(*(t for t in (x, weights, indices, w_gate_up, w_down, b_gate_up, b_down) if t is not None))
    num_tokens, dim = x.shape
    num_experts, ffn = w_gate_up.shape[0], w_down.shape[2]
    k = indices.shape[1]
    y = torch.empty_like(x)  # [T, D]
    if num_tokens == 0 or k == 0:
        return y.zero_()
    num_pairs = num_tokens * k
    config = config or sparse_moe_config(num_tokens, num_experts, k, x.element_size())
    x, w_gate_up, w_down = x.contiguous(), w_gate_up.contiguous(), w_down.contiguous()
    b_gate_up = None if b_gate_up is None else b_gate_up.contiguous()  # None: the kernel is built without it
    b_down = None if b_down is None else b_down.contiguous()
    clamped = activation == "clamped_swiglu"
    alpha, limit = (float(alpha), float(limit)) if clamped else (None, None)  # SwiGLU's kernel takes neither
    indices = indices.contiguous()
    routing = weights.contiguous().view(-1)  # [P] fp32

    sorted_ids, expert_ids, num_padded = moe_align(indices, num_experts, config.block_m, align)
    max_blocks = expert_ids.numel()
    # The interpreter multiplies bf16 tiles as their raw 16-bit patterns (Triton 3.6 to 3.9), so
    # there the operands go to fp32 first: the same products (bf16 x bf16 is exact in fp32) and the
    # same fp32 accumulation as the tensor cores.
    upcast = interpreting() and x.dtype == torch.bfloat16
    precision = "ieee" if x.dtype == torch.float32 else "tf32"

    h = torch.empty(num_pairs, ffn, dtype=x.dtype, device=x.device)  # [P, F]
    cfg = config.gate_up
    moe_gate_up_kernel[(max_blocks, triton.cdiv(ffn, cfg.block_n))](
        x, w_gate_up, b_gate_up, h, sorted_ids, expert_ids, num_padded, num_pairs, alpha, limit,
        D=dim, F=ffn, K=k, BLOCK_M=config.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        UPCAST=upcast, PRECISION=precision, GROUP_M=cfg.group_m, ACTIVATION=activation,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **(dict(routing_ptr=routing, WEIGHT_INPUT=1) if weight_input else {}),
    )  # fmt: skip
    slots = torch.empty(num_pairs, dim, dtype=x.dtype, device=x.device)  # [P, D] = [T, K, D]
    cfg = config.down
    moe_down_kernel[(max_blocks, triton.cdiv(dim, cfg.block_n))](
        h, w_down, b_down, slots, routing, sorted_ids, expert_ids, num_padded, num_pairs,
        D=dim, F=ffn, BLOCK_M=config.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        UPCAST=upcast, PRECISION=precision, GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **(dict(WEIGHT_INPUT=1) if weight_input else {}),
    )  # fmt: skip
    block_d = min(config.combine_block_d, next_power_of_2(dim))
    moe_combine_kernel[(num_tokens, triton.cdiv(dim, block_d))](
        slots, indices, y, num_experts, D=dim, K=k, BLOCK_D=block_d, num_warps=4 if block_d >= 512 else 1,
    )  # fmt: skip
    return y

