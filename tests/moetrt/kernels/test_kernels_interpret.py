"""The Triton kernels on the CPU, in Triton's interpreter (``TRITON_INTERPRET=1``), on tiny shapes.

``TopKRouting``: softmax and sigmoid, k = 1..8, E up to 256, several programs, exact ties, NaN.
Router logits: both inner products (broadcast and ``tl.dot``), several programs on each axis,
masked D, mixed dtypes, with and without a bias. ``SparseMoE``: odd token counts, experts no token picks, k = 1..4,
masked (non-multiple-of-16) D and F, several blocks per expert, fp32/fp16/bf16, the default config table, T = 0,
dropped out-of-range experts, both alignment methods, degenerate equivalences, determinism; gpt-oss's clamped SwiGLU
with and without each bias, on the decode and the prefill rows of the table; and the wrappers that
``maybe_register_cuda_kernels`` installs for CUDA.

The interpreter mode is fixed when triton is imported. When this process already imported triton
compiled (another test module did, on a GPU machine), the whole file reruns in a fresh process.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moetrt.ops import sparse_moe_reference, topk_routing_reference
from moetrt.ops.kernels import triton_mode

if importlib.util.find_spec("triton") is None:
    pytest.skip(reason="triton is not installed (pip install moetrt[gpu])", allow_module_level=True)
if triton_mode() is None:
    os.environ["TRITON_INTERPRET"] = "1"  # before the first import of triton
IN_PROCESS = triton_mode() != "compiled"
in_process = pytest.mark.skipif(
    not IN_PROCESS, reason="triton is compiled here: test_rerun_in_interpreter runs this file"
)

if IN_PROCESS:
    from moetrt.ops.kernels import (
        _router_logits_cuda,
        _sparse_moe_cuda,
        _topk_routing_cuda,
        maybe_register_cuda_kernels,
        router_logits,
    )
    from moetrt.ops.kernels.configs import router_logits_blocks
    from moetrt.ops.kernels.configs import GemmConfig, SparseMoEConfig, sparse_moe_config
    import triton
    import triton.language as tl

    from moetrt.ops.kernels.sparse_moe_triton import moe_align, sparse_moe_triton, tile_ids

    @triton.jit
    def _count_tiles(counts_ptr, GROUP_M: tl.constexpr):
        pid_m, pid_n = tile_ids(GROUP_M)
        tl.atomic_add(counts_ptr + pid_m * tl.num_programs(1) + pid_n, 1)
    from moetrt.ops.kernels.router_logits_triton import router_logits_triton
    from moetrt.ops.kernels.topk_routing_triton import topk_routing_triton

    SMALL = SparseMoEConfig(16, gate_up=GemmConfig(16, 16), down=GemmConfig(16, 16), combine_block_d=16)

# (tokens T, experts E, k, scoring, normalize, scale); E=128/256 rows use several programs
ROUTING_CASES = [
    (1, 8, 2, "softmax", True, 1.0),
    (7, 8, 1, "softmax", False, 1.0),
    (5, 6, 3, "sigmoid", False, 2.5),
    (13, 60, 4, "softmax", True, 1.0),
    (40, 128, 8, "sigmoid", True, 1.0),
    (19, 256, 8, "softmax", False, 0.5),
    # normalize=2: the Euclidean norm (DBRX)
    (9, 16, 4, "softmax", 2, 1.0),
    (6, 60, 3, "sigmoid", 2, 2.0),
]
# (logits row, k, expected indices): exact ties go to the lower expert index
TIE_CASES = [
    ([1.0, 3.0, 3.0, 0.0, 3.0, 2.0], 3, [1, 2, 4]),
    ([2.0, 2.0, 2.0, 2.0], 2, [0, 1]),
    ([0.0, 5.0, 1.0, 5.0], 1, [1]),
    ([-1.0, -1.0, 4.0, -1.0, 4.0], 4, [2, 4, 0, 1]),
]
# (tokens T, experts E, model dim D, x dtype, weight dtype): broadcast rows first (T < 16 or E < 16,
# one or several programs per axis), then tl.dot rows; D not a power of two masks the K loop
ROUTER_CASES = [
    (1, 8, 64, torch.bfloat16, torch.bfloat16),
    (7, 8, 40, torch.float32, torch.float32),
    (33, 8, 96, torch.bfloat16, torch.bfloat16),
    (5, 60, 48, torch.float16, torch.float16),
    (3, 40, 24, torch.bfloat16, torch.float32),
    (40, 64, 64, torch.bfloat16, torch.bfloat16),
    (17, 20, 24, torch.float32, torch.float32),
    (19, 256, 32, torch.float16, torch.float32),
]
# NOTE: the same fp32 products as F.linear(x.float(), w.float()) (model-dtype values are exact
# in fp32), summed in another order: sums of <= 96 products of unit values, float32 ulps.
ROUTER_ATOL = 2e-5

# (tokens T, model dim D, expert dim F, experts E, k, dtype); D, F not multiples of 16 mask the K loop
MOE_CASES = [
    (1, 32, 16, 4, 1, torch.float32),
    (7, 40, 24, 5, 2, torch.float32),
    (13, 32, 48, 8, 3, torch.float32),
    (5, 48, 20, 6, 4, torch.float32),
    (33, 24, 32, 3, 2, torch.float32),  # 22 rows per expert: two blocks each
    (11, 32, 48, 8, 2, torch.float16),
    (9, 48, 32, 5, 2, torch.bfloat16),
]
# (tokens T, model dim D, expert dim F, experts E, k, dtype, path): gpt-oss's activation on masked D/F; "decode" and
# "prefill" launch the config table's 16- and 128-row blocks (T*k/E <= 16 and > 256), "small tiles" 16 x 16 tiles
GPT_OSS_CASES = [
    (5, 40, 24, 6, 2, torch.float32, "small tiles"),
    (3, 48, 20, 8, 4, torch.float32, "decode"),
    (400, 24, 40, 3, 2, torch.float32, "prefill"),
    (11, 32, 48, 8, 2, torch.float16, "small tiles"),
    (9, 48, 32, 5, 2, torch.bfloat16, "decode"),
]
GPT_OSS_ALPHA, GPT_OSS_LIMIT = 1.702, 1.5  # gpt-oss's alpha; a limit the unit-variance projections cross often
# NOTE: float32 kernels against a float64 reference of the same inputs; sums of <= 48 products.
FP32_RTOL = 1e-5
# NOTE: relative Frobenius error of half-precision outputs against the float64 reference of the
# same (rounded) inputs: the kernel rounds h, each slot's output and y to the dtype, 3 roundings of
# 2^-11 (fp16). The interpreter converts fp32 to bf16 by truncation, not round-to-nearest as the
# GPU does, so each of the 3 bf16 roundings costs up to 2^-8 = 3.9e-3, biased one way.
HALF_RTOL = {torch.float16: 3e-3, torch.bfloat16: 3e-2}


def _rel_fro(ours: np.ndarray, ref: np.ndarray) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


def _distinct_logits(tokens: int, experts: int, seed: int) -> torch.Tensor:
    """Scores at least 4/E apart in logit space: no near-ties, so the index order is certain."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(experts, generator=g) for _ in range(tokens)]).float() * (4.0 / experts) - 2.0


def _routing(tokens: int, experts: int, k: int, seed: int, skip=lambda e: e % 3 == 1):
    """Distinct experts per token drawn from those ``skip`` leaves, and random fp32 weights."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(experts) if not skip(e)] if experts > k + 1 else list(range(experts)))
    indices = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:k]] for _ in range(tokens)])
    return torch.rand(tokens, k, generator=g), indices.to(torch.int32)


def _experts(num_experts, dim, ffn, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    gu_scale, d_scale = dim**-0.5, ffn**-0.5  # unit-variance outputs of each projection
    w_gate_up = (torch.randn(num_experts, 2 * ffn, dim, generator=g) * gu_scale).to(dtype)
    w_down = (torch.randn(num_experts, dim, ffn, generator=g) * d_scale).to(dtype)
    return w_gate_up, w_down


def _reference(x, weights, indices, w_gate_up, w_down, b_gate_up=None, b_down=None, **attrs) -> np.ndarray:
    as64 = lambda t: None if t is None else t.double().numpy()  # noqa: E731
    return sparse_moe_reference(
        x.double().numpy(), weights.numpy(), indices.numpy(), as64(w_gate_up), as64(w_down), as64(b_gate_up),
        as64(b_down), **attrs,
    )


def _biases(num_experts, dim, ffn, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_experts, 2 * ffn, generator=g).to(dtype), torch.randn(num_experts, dim, generator=g).to(dtype)


# --- TopKRouting ---------------------------------------------------------------------------------
@in_process
@pytest.mark.parametrize("tokens,experts,k,scoring,normalize,scale", ROUTING_CASES)
def test_topk_routing_matches_reference_and_op(tokens, experts, k, scoring, normalize, scale):
    logits = _distinct_logits(tokens, experts, seed=tokens * experts)
    weights, indices = topk_routing_triton(logits, k, scoring, normalize, scale)
    ref_w, ref_i = topk_routing_reference(logits.numpy(), k, scoring, normalize, scale)
    op_w, op_i = torch.ops.moetrt.TopKRouting(logits, k, scoring, normalize, scale)
    assert weights.dtype == torch.float32 and indices.dtype == torch.int32
    assert weights.shape == indices.shape == (tokens, k)
    np.testing.assert_array_equal(indices.numpy(), ref_i)
    assert torch.equal(indices, op_i)
    # NOTE: float32 exp/divide/sum against float64; weights <= scale
    np.testing.assert_allclose(weights.numpy(), ref_w, rtol=2e-6, atol=1e-7 * scale)
    torch.testing.assert_close(weights, op_w, rtol=2e-6, atol=1e-7 * scale)


@in_process
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("row,k,expected", TIE_CASES)
def test_topk_routing_ties_go_to_the_lower_index(row, k, expected, scoring):
    logits = torch.tensor([row, row[::-1]], dtype=torch.float32)
    _, indices = topk_routing_triton(logits, k, scoring, True, 1.0)
    assert indices[0].tolist() == expected
    _, ref_i = topk_routing_reference(logits.numpy(), k, scoring, True, 1.0)
    np.testing.assert_array_equal(indices.numpy(), ref_i)


@in_process
def test_topk_routing_nan_logits_rank_first_and_stay_nan():
    logits = torch.tensor([[0.0, 1.0, float("nan"), 2.0], [float("nan")] * 4])
    weights, indices = topk_routing_triton(logits, 2, "sigmoid", False, 1.0)
    op_w, op_i = torch.ops.moetrt.TopKRouting(logits, 2, "sigmoid", False, 1.0)
    assert indices.tolist() == op_i.tolist() == [[2, 3], [0, 1]]
    assert torch.isnan(weights[0, 0]) and not torch.isnan(weights[0, 1]) and torch.isnan(weights[1]).all()
    torch.testing.assert_close(weights, op_w, equal_nan=True)


@in_process
def test_topk_routing_non_contiguous_and_empty():
    logits = _distinct_logits(8, 5, seed=3).t().contiguous().t()  # [8, 5] stored column-major
    strided = _distinct_logits(6, 10, seed=4)[:, ::2]  # [6, 5], row stride 10
    for x in (logits, strided):
        w, i = topk_routing_triton(x, 2, "softmax", True, 1.0)
        ref_w, ref_i = topk_routing_reference(x.numpy(), 2, "softmax", True, 1.0)
        np.testing.assert_array_equal(i.numpy(), ref_i)
        np.testing.assert_allclose(w.numpy(), ref_w, rtol=2e-6, atol=1e-7)
    w, i = topk_routing_triton(torch.zeros(0, 8), 2)
    assert w.shape == i.shape == (0, 2)


@in_process
def test_topk_routing_rejects_what_the_op_rejects():
    with pytest.raises(ValueError, match="float32"):
        topk_routing_triton(torch.zeros(3, 8, dtype=torch.float16), 2)
    with pytest.raises(ValueError, match="k must be in"):
        topk_routing_triton(torch.zeros(3, 8), 9)
    with pytest.raises(ValueError, match="scoring"):
        topk_routing_triton(torch.zeros(3, 8), 2, "relu")
    with pytest.raises(ValueError, match="n_group"):  # checked as the op checks it, before the kernel's refusal
        topk_routing_triton(torch.zeros(3, 8), 2, n_group=3)


@in_process
@pytest.mark.parametrize("kwargs,named", [
    (dict(selection_bias=torch.zeros(8)), "selection_bias"),
    (dict(n_group=4, topk_group=2), "n_group=4, topk_group=2"),
    (dict(n_group=2, group_scoring="max"), "n_group=2, group_scoring='max'"),
    (dict(norm_min=0.5), "norm_min=0.5"),  # version 3
])
def test_topk_routing_refuses_version_2_arguments_by_name(kwargs, named):
    logits = _distinct_logits(3, 8, seed=1)
    with pytest.raises(ValueError, match=r"Triton kernel does not implement " + re.escape(named)):
        topk_routing_triton(logits, 2, "sigmoid", True, 1.0, **kwargs)


@in_process
@pytest.mark.parametrize("kwargs", [
    dict(selection_bias=torch.linspace(-0.3, 0.4, 8)),
    dict(n_group=4, topk_group=2),
    dict(selection_bias=torch.linspace(0.5, -0.2, 8), n_group=2, topk_group=1, group_scoring="max"),
    dict(selection_bias=torch.linspace(-0.3, 0.4, 8), norm_min=2.2),  # version 3: the clamp acts on some rows
], ids=["bias", "groups", "bias-groups-max", "bias-norm_min"])
def test_topk_routing_cuda_wrapper_runs_version_2_on_the_composite(kwargs):
    """The wrapper CUDA dispatch calls takes the op's PyTorch composite for version-2 calls: the reference's result."""
    logits = _distinct_logits(37, 8, seed=2)
    weights, indices = _topk_routing_cuda(logits, 3, "sigmoid", True, 2.5, **kwargs)
    numpy_kwargs = {name: v.numpy() if isinstance(v, torch.Tensor) else v for name, v in kwargs.items()}
    ref_w, ref_i = topk_routing_reference(logits.numpy(), 3, "sigmoid", True, 2.5, **numpy_kwargs)
    assert indices.dtype == torch.int32 and weights.dtype == torch.float32
    np.testing.assert_array_equal(indices.numpy(), ref_i)  # distinct logits: no ties to break
    np.testing.assert_allclose(weights.numpy(), ref_w, rtol=1e-6, atol=0)  # fp32 sigmoid vs float64: a few ulps
    # version-1 calls still take the kernel
    w1, i1 = _topk_routing_cuda(logits, 3, "sigmoid", True, 2.5)
    k1, j1 = topk_routing_triton(logits, 3, "sigmoid", True, 2.5)
    assert torch.equal(i1, j1) and torch.equal(w1, k1)


@in_process
@pytest.mark.parametrize("tokens,experts,eps,spread,normalize,scale", [
    (37, 6, 0.3, 1.0, False, 1.0), (70, 16, 0.01, 0.05, True, 2.0), (5, 130, 0.2, 0.5, False, 1.0),
    (9, 2, 0.0, 1.0, True, 1.0), (0, 8, 0.3, 1.0, False, 1.0),
])
def test_sparsemixer_matches_reference_and_op(tokens, experts, eps, spread, normalize, scale):
    """PhiMoE's routing (TopKRouting version 4): its own kernel, several programs, masks kept and dropped."""
    logits = _distinct_logits(tokens, experts, seed=tokens + experts) * spread if tokens else torch.zeros(0, experts)
    weights, indices = topk_routing_triton(logits, 2, "sparsemixer", normalize, scale, jitter_eps=eps)
    ref_w, ref_i = topk_routing_reference(logits.numpy(), 2, "sparsemixer", normalize, scale, jitter_eps=eps)
    op_w, op_i = torch.ops.moetrt.TopKRouting(logits, 2, "sparsemixer", normalize, scale, jitter_eps=eps)
    np.testing.assert_array_equal(indices.numpy(), ref_i)
    assert torch.equal(indices, op_i)
    # NOTE: float32 exp/sum against float64 softmaxes
    np.testing.assert_allclose(weights.numpy(), ref_w, rtol=2e-6, atol=1e-7 * scale)
    torch.testing.assert_close(weights, op_w, rtol=2e-6, atol=1e-7 * scale)
    wrapped = _topk_routing_cuda(logits, 2, "sparsemixer", normalize, scale, jitter_eps=eps)  # what CUDA dispatch runs
    assert torch.equal(wrapped[0], weights) and torch.equal(wrapped[1], indices)


@in_process
def test_sparsemixer_ties_go_to_the_lower_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5], [2.0, 2.0, 2.0, 2.0]])
    weights, indices = topk_routing_triton(logits, 2, "sparsemixer", False, 1.0, jitter_eps=0.1)
    op_w, op_i = torch.ops.moetrt.TopKRouting(logits, 2, "sparsemixer", False, 1.0, jitter_eps=0.1)
    assert indices.tolist() == op_i.tolist() == [[1, 2], [0, 1]]
    torch.testing.assert_close(weights, op_w)


# --- alignment -----------------------------------------------------------------------------------
@in_process
@pytest.mark.parametrize("tokens,experts,k,block_m", [(1, 4, 1, 16), (7, 5, 2, 16), (33, 3, 2, 16), (50, 40, 4, 32)])
def test_align_layout(tokens, experts, k, block_m):
    _, indices = _routing(tokens, experts, k, seed=tokens + experts)
    indices[0, 0] = experts  # out of range: dropped
    num_pairs = tokens * k
    layouts = {method: moe_align(indices, experts, block_m, method) for method in ("triton", "torch")}
    for method, (sorted_ids, expert_ids, num_padded) in layouts.items():
        used = int(num_padded)
        flat = indices.reshape(-1).long()
        counts = torch.bincount(flat[(flat >= 0) & (flat < experts)], minlength=experts)
        assert used == int(((counts + block_m - 1) // block_m * block_m).sum()), method
        slots, blocks = sorted_ids[:used].long(), expert_ids[: used // block_m].long()
        assert used // block_m <= expert_ids.numel() and used <= sorted_ids.numel()
        real = slots < num_pairs
        # every valid pair exactly once, in a block of its own expert, in pair order within the expert
        assert sorted(slots[real].tolist()) == [p for p in range(num_pairs) if 0 <= flat[p] < experts], method
        assert torch.equal(flat[slots[real]], blocks.repeat_interleave(block_m)[real]), method
        for e in range(experts):
            mine = slots[real][flat[slots[real]] == e]
            assert torch.equal(mine, mine.sort().values), method
        assert bool((slots[~real] == num_pairs).all()), method
    (a_ids, a_exp, a_n), (b_ids, b_exp, b_n) = layouts["triton"], layouts["torch"]
    used = int(a_n)
    assert int(b_n) == used
    assert torch.equal(a_ids[:used], b_ids[:used]) and torch.equal(a_exp[: used // block_m], b_exp[: used // block_m])


# --- SparseMoE -----------------------------------------------------------------------------------
@in_process
@pytest.mark.parametrize("tokens,dim,ffn,experts,k,dtype", MOE_CASES)
def test_sparse_moe_matches_reference(tokens, dim, ffn, experts, k, dtype, record_max):
    weights, indices = _routing(tokens, experts, k, seed=tokens)
    picked = set(indices.reshape(-1).tolist())
    assert len(picked) < experts or experts <= k + 1  # some expert gets no token
    x = torch.randn(tokens, dim).to(dtype)
    w_gate_up, w_down = _experts(experts, dim, ffn, dtype, seed=dim)
    y = sparse_moe_triton(x, weights, indices, w_gate_up, w_down, config=SMALL)
    assert y.dtype == dtype and y.shape == (tokens, dim)
    err = _rel_fro(y.double().numpy(), _reference(x, weights, indices, w_gate_up, w_down))
    record_max("Triton kernels (interpreter): relative Frobenius error vs float64", f"SparseMoE {dtype}", err)
    assert err <= (FP32_RTOL if dtype == torch.float32 else HALF_RTOL[dtype]), err
    if dtype == torch.float32:
        op = torch.ops.moetrt.SparseMoE(x, weights, indices, w_gate_up, w_down, activation="silu")
        torch.testing.assert_close(y, op, rtol=FP32_RTOL, atol=FP32_RTOL * float(op.abs().max()))


@in_process
@pytest.mark.parametrize("align", ["triton", "torch"])
def test_sparse_moe_default_config_int64_indices_and_align_methods(align):
    tokens, dim, ffn, experts, k = 6, 32, 24, 4, 2
    weights, indices = _routing(tokens, experts, k, seed=1)
    x = torch.randn(tokens, dim)
    w_gate_up, w_down = _experts(experts, dim, ffn, torch.float32, seed=2)
    y = sparse_moe_triton(x, weights, indices.long(), w_gate_up, w_down, align=align)  # config from the table
    assert _rel_fro(y.numpy(), _reference(x, weights, indices, w_gate_up, w_down)) <= FP32_RTOL


@in_process
@pytest.mark.parametrize("group_m", [0, 1, 2, 3, 8, 100])
@pytest.mark.parametrize("grid", [(1, 1), (5, 3), (8, 2), (7, 7)])
def test_grouped_tile_order_covers_every_tile_once(grid, group_m):
    counts = torch.zeros(grid, dtype=torch.int32)
    _count_tiles[grid](counts, GROUP_M=group_m)
    assert torch.equal(counts, torch.ones(grid, dtype=torch.int32))


@in_process
@pytest.mark.parametrize("group_m", [(1, 0), (3, 2), (0, 5)])
def test_grouped_tile_order_gives_the_same_outputs(group_m):
    # 33 tokens, top-2 of 3 experts, 16-row blocks: 6+ M blocks over 2-3 N tiles; groups that
    # divide them, leave a short last group, or exceed them
    tokens, dim, ffn, experts, k = 33, 40, 48, 3, 2
    weights, indices = _routing(tokens, experts, k, seed=21)
    x = torch.randn(tokens, dim, generator=torch.Generator().manual_seed(22))
    w_gate_up, w_down = _experts(experts, dim, ffn, torch.float32, seed=23)
    gate_up, down = GemmConfig(16, 16, group_m=group_m[0]), GemmConfig(16, 16, group_m=group_m[1])
    grouped = SparseMoEConfig(16, gate_up=gate_up, down=down, combine_block_d=16)
    y = sparse_moe_triton(x, weights, indices, w_gate_up, w_down, config=grouped)
    assert torch.equal(y, sparse_moe_triton(x, weights, indices, w_gate_up, w_down, config=SMALL))
    assert _rel_fro(y.numpy(), _reference(x, weights, indices, w_gate_up, w_down)) <= FP32_RTOL


@in_process
def test_sparse_moe_drops_out_of_range_experts():
    tokens, dim, ffn, experts, k = 5, 16, 16, 4, 2
    weights, indices = _routing(tokens, experts, k, seed=5)
    x = torch.randn(tokens, dim)
    w_gate_up, w_down = _experts(experts, dim, ffn, torch.float32, seed=6)
    bad = indices.clone()
    bad[1, 0], bad[3, 1] = experts, -1
    kept = weights.clone()
    kept[1, 0] = kept[3, 1] = 0.0
    ref = _reference(x, kept, indices, w_gate_up, w_down)
    for align in ("triton", "torch"):
        y = sparse_moe_triton(x, weights, bad, w_gate_up, w_down, config=SMALL, align=align)
        assert _rel_fro(y.numpy(), ref) <= FP32_RTOL, align


@in_process
def test_one_expert_top1_is_a_dense_swiglu_ffn():
    tokens, dim, ffn = 9, 24, 40
    x = torch.randn(tokens, dim)
    w_gate_up, w_down = _experts(1, dim, ffn, torch.float32, seed=7)
    y = sparse_moe_triton(
        x, torch.ones(tokens, 1), torch.zeros(tokens, 1, dtype=torch.int32), w_gate_up, w_down, config=SMALL
    )
    gate, up = (x @ w_gate_up[0].t()).chunk(2, dim=-1)
    dense = (F.silu(gate) * up) @ w_down[0].t()
    torch.testing.assert_close(y, dense, rtol=FP32_RTOL, atol=FP32_RTOL * float(dense.abs().max()))


@in_process
def test_k_equal_e_is_the_dense_mixture():
    tokens, dim, ffn, experts = 7, 16, 24, 4
    x = torch.randn(tokens, dim)
    w_gate_up, w_down = _experts(experts, dim, ffn, torch.float32, seed=8)
    probs = torch.softmax(torch.randn(tokens, experts), dim=-1)
    indices = torch.stack([torch.randperm(experts) for _ in range(tokens)]).to(torch.int32)  # all experts, any order
    y = sparse_moe_triton(x, probs.gather(1, indices.long()), indices, w_gate_up, w_down, config=SMALL)
    dense = torch.zeros(tokens, dim)
    for e in range(experts):
        gate, up = (x @ w_gate_up[e].t()).chunk(2, dim=-1)
        dense += probs[:, e : e + 1] * ((F.silu(gate) * up) @ w_down[e].t())
    torch.testing.assert_close(y, dense, rtol=FP32_RTOL, atol=FP32_RTOL * float(dense.abs().max()))


@in_process
def test_batch_equals_rows_one_by_one_and_runs_are_bitwise_equal():
    tokens, dim, ffn, experts, k = 5, 32, 16, 4, 2
    weights, indices = _routing(tokens, experts, k, seed=9)
    x = torch.randn(tokens, dim).to(torch.float16)
    w_gate_up, w_down = _experts(experts, dim, ffn, torch.float16, seed=10)
    y = sparse_moe_triton(x, weights, indices, w_gate_up, w_down, config=SMALL)
    assert torch.equal(y, sparse_moe_triton(x, weights, indices, w_gate_up, w_down, config=SMALL))
    rows = [
        sparse_moe_triton(x[t : t + 1], weights[t : t + 1], indices[t : t + 1], w_gate_up, w_down, config=SMALL)
        for t in range(tokens)
    ]
    assert torch.equal(y, torch.cat(rows))


@in_process
def test_sparse_moe_empty_and_errors():
    w_gate_up, w_down = _experts(4, 16, 8, torch.float32, seed=11)
    y = sparse_moe_triton(
        torch.zeros(0, 16), torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.int32), w_gate_up, w_down
    )
    assert y.shape == (0, 16)
    with pytest.raises(ValueError, match="share one dtype"):
        sparse_moe_triton(
            torch.zeros(2, 16, dtype=torch.float16),
            torch.zeros(2, 2),
            torch.zeros(2, 2, dtype=torch.int32),
            w_gate_up,
            w_down,
        )
    with pytest.raises(ValueError, match="activation"):
        sparse_moe_triton(
            torch.zeros(2, 16), torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.int32), w_gate_up, w_down,
            activation="gelu",
        )
    with pytest.raises(ValueError, match="b_down"):
        sparse_moe_triton(
            torch.zeros(2, 16), torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.int32), w_gate_up, w_down,
            b_down=torch.zeros(4, 8),
        )


# --- SparseMoE: gpt-oss's clamped SwiGLU and expert biases ---------------------------------------
@in_process
@pytest.mark.parametrize("gate_up_bias,down_bias", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("tokens,dim,ffn,experts,k,dtype,path", GPT_OSS_CASES)
def test_clamped_swiglu_and_biases_match_reference_and_op(tokens, dim, ffn, experts, k, dtype, path, gate_up_bias,
                                                          down_bias, record_max):
    weights, indices = _routing(tokens, experts, k, seed=tokens + 40)
    x = (torch.randn(tokens, dim, generator=torch.Generator().manual_seed(41)) * 2).to(dtype)
    w_gate_up, w_down = _experts(experts, dim, ffn, dtype, seed=42)
    b_gate_up, b_down = _biases(experts, dim, ffn, dtype, seed=43)
    b_gate_up, b_down = (b_gate_up if gate_up_bias else None), (b_down if down_bias else None)
    attrs = dict(activation="clamped_swiglu", alpha=GPT_OSS_ALPHA, limit=GPT_OSS_LIMIT)
    config = SMALL if path == "small tiles" else None  # None: the table's row (decode 16-row, prefill 128-row blocks)
    if path != "small tiles":
        assert sparse_moe_config(tokens, experts, k).block_m == (16 if path == "decode" else 128)
    y = sparse_moe_triton(x, weights, indices, w_gate_up, w_down, b_gate_up, b_down, **attrs, config=config)
    assert y.dtype == dtype and y.shape == (tokens, dim)
    ref = _reference(x, weights, indices, w_gate_up, w_down, b_gate_up, b_down, **attrs)
    err = _rel_fro(y.double().numpy(), ref)
    record_max("Triton kernels (interpreter): relative Frobenius error vs float64", f"clamped SwiGLU {dtype}", err)
    assert err <= (FP32_RTOL if dtype == torch.float32 else HALF_RTOL[dtype]), err
    # the inputs reach both clamps, so a kernel without them (or with the other activation) fails above
    gate_up = torch.einsum("td,efd->tef", x.double(), w_gate_up.double())[:, indices.unique().long()]
    assert (gate_up[..., :ffn] > GPT_OSS_LIMIT).any() and (gate_up[..., ffn:] < -GPT_OSS_LIMIT).any()
    if dtype == torch.float32:
        op = torch.ops.moetrt.SparseMoE(x, weights, indices, w_gate_up, w_down, b_gate_up, b_down, *attrs.values())
        torch.testing.assert_close(y, op, rtol=FP32_RTOL, atol=FP32_RTOL * float(op.abs().max()))


# --- SparseMoE: Gemma 4's GeGLU (gelu_tanh) ---------------------------------------------------------
@in_process
@pytest.mark.parametrize("tokens,dim,ffn,experts,k,dtype,path", [GPT_OSS_CASES[0], GPT_OSS_CASES[1], GPT_OSS_CASES[4]])
def test_gelu_tanh_matches_reference_and_op(tokens, dim, ffn, experts, k, dtype, path, record_max):
    weights, indices = _routing(tokens, experts, k, seed=tokens + 60)
    x = (torch.randn(tokens, dim, generator=torch.Generator().manual_seed(61)) * 2).to(dtype)
    w_gate_up, w_down = _experts(experts, dim, ffn, dtype, seed=62)
    config = SMALL if path == "small tiles" else None
    y = sparse_moe_triton(x, weights, indices, w_gate_up, w_down, activation="gelu_tanh", config=config)
    ref = _reference(x, weights, indices, w_gate_up, w_down, activation="gelu_tanh")
    err = _rel_fro(y.double().numpy(), ref)
    record_max("Triton kernels (interpreter): relative Frobenius error vs float64", f"gelu_tanh {dtype}", err)
    assert err <= (FP32_RTOL if dtype == torch.float32 else HALF_RTOL[dtype]), err
    # SwiGLU on the same inputs differs: the kernel took the GeGLU branch
    assert _rel_fro(sparse_moe_triton(x, weights, indices, w_gate_up, w_down, config=config).double().numpy(), ref) > 1e-2
    if dtype == torch.float32:
        op = torch.ops.moetrt.SparseMoE(x, weights, indices, w_gate_up, w_down, activation="gelu_tanh")
        torch.testing.assert_close(y, op, rtol=FP32_RTOL, atol=FP32_RTOL * float(op.abs().max()))


@in_process
def test_biases_are_zero_biases_and_silu_keeps_its_result():
    """A zero bias adds nothing (bitwise), and SwiGLU with biases is the op's SwiGLU with biases."""
    tokens, dim, ffn, experts, k = 9, 24, 40, 5, 2
    weights, indices = _routing(tokens, experts, k, seed=50)
    x = torch.randn(tokens, dim, generator=torch.Generator().manual_seed(51))
    w_gate_up, w_down = _experts(experts, dim, ffn, torch.float32, seed=52)
    zeros_gu, zeros_d = torch.zeros(experts, 2 * ffn), torch.zeros(experts, dim)
    for activation in ("silu", "clamped_swiglu"):
        plain = sparse_moe_triton(x, weights, indices, w_gate_up, w_down, activation=activation, config=SMALL)
        zero = sparse_moe_triton(x, weights, indices, w_gate_up, w_down, zeros_gu, zeros_d, activation, config=SMALL)
        assert torch.equal(plain, zero), activation
    b_gate_up, b_down = _biases(experts, dim, ffn, torch.float32, seed=53)
    y = sparse_moe_triton(x, weights, indices, w_gate_up, w_down, b_gate_up, b_down, config=SMALL)
    op = torch.ops.moetrt.SparseMoE(x, weights, indices, w_gate_up, w_down, b_gate_up, b_down, "silu", 1.702, 7.0)
    torch.testing.assert_close(y, op, rtol=FP32_RTOL, atol=FP32_RTOL * float(op.abs().max()))


@in_process
def test_one_expert_top1_is_gpt_oss_dense_mlp():
    """One expert, top-1, weight 1: the dense gpt-oss MLP, written as transformers writes it (interleaved)."""
    tokens, dim, ffn = 7, 24, 40
    x = torch.randn(tokens, dim, generator=torch.Generator().manual_seed(60)) * 2
    w_gate_up, w_down = _experts(1, dim, ffn, torch.float32, seed=61)
    b_gate_up, b_down = _biases(1, dim, ffn, torch.float32, seed=62)
    y = sparse_moe_triton(x, torch.ones(tokens, 1), torch.zeros(tokens, 1, dtype=torch.int32), w_gate_up, w_down,
                          b_gate_up, b_down, "clamped_swiglu", GPT_OSS_ALPHA, GPT_OSS_LIMIT, config=SMALL)
    # transformers' GptOssExperts: gate_up interleaved (gate at even, up at odd columns)
    interleaved_w = torch.stack((w_gate_up[0, :ffn], w_gate_up[0, ffn:]), dim=1).reshape(2 * ffn, dim)
    interleaved_b = torch.stack((b_gate_up[0, :ffn], b_gate_up[0, ffn:]), dim=1).reshape(2 * ffn)
    gate_up = x @ interleaved_w.t() + interleaved_b
    gate, up = gate_up[..., ::2].clamp(max=GPT_OSS_LIMIT), gate_up[..., 1::2].clamp(-GPT_OSS_LIMIT, GPT_OSS_LIMIT)
    dense = ((up + 1) * (gate * torch.sigmoid(gate * GPT_OSS_ALPHA))) @ w_down[0].t() + b_down[0]
    torch.testing.assert_close(y, dense, rtol=FP32_RTOL, atol=FP32_RTOL * float(dense.abs().max()))


@in_process
def test_clamped_swiglu_with_biases_drops_out_of_range_experts_and_skips_empty_ones():
    tokens, dim, ffn, experts, k = 6, 16, 24, 6, 2
    weights, indices = _routing(tokens, experts, k, seed=70, skip=lambda e: e in (1, 4))  # experts 1 and 4: empty
    x = torch.randn(tokens, dim, generator=torch.Generator().manual_seed(71)) * 2
    w_gate_up, w_down = _experts(experts, dim, ffn, torch.float32, seed=72)
    b_gate_up, b_down = _biases(experts, dim, ffn, torch.float32, seed=73)
    attrs = dict(activation="clamped_swiglu", alpha=GPT_OSS_ALPHA, limit=GPT_OSS_LIMIT)
    bad = indices.clone()
    bad[2, 1] = experts
    kept = weights.clone()
    kept[2, 1] = 0.0  # a dropped pair contributes nothing, its down bias included
    ref = _reference(x, kept, indices, w_gate_up, w_down, b_gate_up, b_down, **attrs)
    for align in ("triton", "torch"):
        y = sparse_moe_triton(x, weights, bad, w_gate_up, w_down, b_gate_up, b_down, **attrs, config=SMALL, align=align)
        assert _rel_fro(y.numpy(), ref) <= FP32_RTOL, align


# --- router logits --------------------------------------------------------------------------------
@in_process
@pytest.mark.parametrize("tokens,experts,dim,x_dtype,w_dtype", ROUTER_CASES)
def test_router_logits_match_the_fp32_linear(tokens, experts, dim, x_dtype, w_dtype):
    g = torch.Generator().manual_seed(tokens * experts + dim)
    x = torch.randn(tokens, dim, generator=g).to(x_dtype)
    weight = (torch.randn(experts, dim, generator=g) * dim**-0.5).to(w_dtype)
    logits = router_logits_triton(x, weight)
    assert logits.dtype == torch.float32 and logits.shape == (tokens, experts)
    expected = F.linear(x.float(), weight.float())  # the model's definition
    torch.testing.assert_close(logits, expected, rtol=0, atol=ROUTER_ATOL)
    exact = (x.double() @ weight.double().t()).float()
    torch.testing.assert_close(logits, exact, rtol=0, atol=ROUTER_ATOL)
    block_t, block_e, _, use_dot, _ = router_logits_blocks(tokens, experts, dim)
    assert use_dot == (tokens >= 16 and experts >= 16)


@in_process
@pytest.mark.parametrize("tokens,experts,dim,x_dtype,w_dtype", [ROUTER_CASES[0], ROUTER_CASES[3], ROUTER_CASES[5],
                                                                 ROUTER_CASES[7]])
def test_router_logits_with_a_bias_match_the_fp32_linear(tokens, experts, dim, x_dtype, w_dtype):
    """gpt-oss's router, F.linear(x, W, b): the bias added in fp32 on both inner products."""
    g = torch.Generator().manual_seed(tokens + experts + dim)
    x = torch.randn(tokens, dim, generator=g).to(x_dtype)
    weight = (torch.randn(experts, dim, generator=g) * dim**-0.5).to(w_dtype)
    bias = (torch.randn(experts, generator=g) * 4).to(w_dtype)
    logits = router_logits_triton(x, weight, bias)
    expected = F.linear(x.float(), weight.float(), bias.float())
    torch.testing.assert_close(logits, expected, rtol=0, atol=ROUTER_ATOL * 4)  # NOTE: |logits| up to ~12 here
    assert not torch.allclose(logits, router_logits_triton(x, weight), rtol=0, atol=1e-3)  # the bias is there
    assert torch.equal(router_logits(x, weight, bias), expected)  # CPU tensors: the PyTorch form exactly


@in_process
def test_router_logits_edges_and_errors():
    weight = torch.randn(8, 16)
    assert router_logits_triton(torch.zeros(0, 16), weight).shape == (0, 8)
    assert torch.equal(router_logits_triton(torch.zeros(3, 0), torch.zeros(8, 0)), torch.zeros(3, 8))
    x = torch.randn(16, 5)[:, :4]  # non-contiguous rows
    torch.testing.assert_close(router_logits_triton(x, weight[:, :4]), x @ weight[:, :4].t(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"same D"):
        router_logits_triton(torch.zeros(3, 16), torch.zeros(8, 12))
    with pytest.raises(ValueError, match=r"bf16, fp16 or fp32"):
        router_logits_triton(torch.zeros(3, 16, dtype=torch.float64), weight)
    with pytest.raises(ValueError, match=r"bias must be \[E=8\]"):
        router_logits_triton(torch.zeros(3, 16), weight, torch.zeros(7))
    bias = torch.randn(8)
    assert torch.equal(router_logits_triton(torch.zeros(3, 0), torch.zeros(8, 0), bias), bias.expand(3, 8))


# --- what maybe_register_cuda_kernels installs ------------------------------------------------------
@in_process
def test_registered_wrappers_take_the_op_arguments():
    assert maybe_register_cuda_kernels() and maybe_register_cuda_kernels()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("moetrt::TopKRouting", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("moetrt::SparseMoE", "CUDA")
    # the dispatcher passes the schema's arguments in order; here on CPU tensors, in the interpreter
    logits = _distinct_logits(7, 8, seed=12)
    weights, indices = _topk_routing_cuda(logits, 2, "softmax", True, 1.0)
    op_w, op_i = torch.ops.moetrt.TopKRouting(logits, 2, "softmax", True, 1.0)  # CPU: still the torch op
    assert torch.equal(indices, op_i)
    torch.testing.assert_close(weights, op_w, rtol=2e-6, atol=1e-7)
    x = torch.randn(7, 16)
    w_gate_up, w_down = _experts(8, 16, 16, torch.float32, seed=13)
    b_gate_up, b_down = _biases(8, 16, 16, torch.float32, seed=14)
    for args in ((None, None, "silu", 1.702, 7.0), (b_gate_up, b_down, "clamped_swiglu", 1.702, 1.5),
                 (None, b_down, "clamped_swiglu", 1.5, 7.0)):
        y = _sparse_moe_cuda(x, weights, indices, w_gate_up, w_down, *args)
        op = torch.ops.moetrt.SparseMoE(x, weights, indices, w_gate_up, w_down, *args)
        torch.testing.assert_close(y, op, rtol=FP32_RTOL, atol=FP32_RTOL * float(op.abs().max()))
    # the router: CPU tensors keep the PyTorch form (as the model on the CPU, and every export)
    gate, gate_bias = torch.randn(8, 16), torch.randn(8)
    assert torch.equal(router_logits(x, gate), F.linear(x, gate))
    assert torch.equal(torch.ops.moetrt_kernels.router_logits(x, gate), F.linear(x, gate))  # the op's CPU kernel
    assert torch.equal(torch.ops.moetrt_kernels.router_logits(x, gate, gate_bias), F.linear(x, gate, gate_bias))
    torch.testing.assert_close(_router_logits_cuda(x, gate), F.linear(x, gate), rtol=0, atol=ROUTER_ATOL)
    torch.testing.assert_close(_router_logits_cuda(x, gate, gate_bias), F.linear(x, gate, gate_bias), rtol=0,
                               atol=ROUTER_ATOL)


# --- when this process runs triton compiled ------------------------------------------------------
@pytest.mark.skipif(IN_PROCESS, reason="triton runs in the interpreter in this process: the tests above ran here")
def test_rerun_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


# --- SparseMoE: Llama 4's input weighting (weight_input=1) --------------------------------------------
@in_process
@pytest.mark.parametrize("tokens,dim,ffn,experts,k,dtype,path", [GPT_OSS_CASES[0], GPT_OSS_CASES[1], GPT_OSS_CASES[3]])
@pytest.mark.parametrize("biases", [False, True], ids=["no-bias", "biases"])
def test_weight_input_matches_reference_and_op(tokens, dim, ffn, experts, k, dtype, path, biases, record_max):
    weights, indices = _routing(tokens, experts, k, seed=tokens + 70)
    x = (torch.randn(tokens, dim, generator=torch.Generator().manual_seed(71)) * 2).to(dtype)
    w_gate_up, w_down = _experts(experts, dim, ffn, dtype, seed=72)
    b_gate_up, b_down = _biases(experts, dim, ffn, dtype, seed=73) if biases else (None, None)
    config = SMALL if path == "small tiles" else None
    y = sparse_moe_triton(x, weights, indices, w_gate_up, w_down, b_gate_up, b_down, weight_input=1, config=config)
    ref = _reference(x, weights, indices, w_gate_up, w_down, b_gate_up, b_down, weight_input=1)
    err = _rel_fro(y.double().numpy(), ref)
    record_max("Triton kernels (interpreter): relative Frobenius error vs float64", f"weight_input {dtype}", err)
    assert err <= (FP32_RTOL if dtype == torch.float32 else HALF_RTOL[dtype]), err
    # weighting the outputs on the same inputs differs: the kernels took the input-weighting branch
    out_weighted = sparse_moe_triton(x, weights, indices, w_gate_up, w_down, b_gate_up, b_down, config=config)
    assert _rel_fro(out_weighted.double().numpy(), ref) > 1e-2
    if dtype == torch.float32:
        op = torch.ops.moetrt.SparseMoE(x, weights, indices, w_gate_up, w_down, b_gate_up, b_down, weight_input=1)
        torch.testing.assert_close(y, op, rtol=FP32_RTOL, atol=FP32_RTOL * float(op.abs().max()))
