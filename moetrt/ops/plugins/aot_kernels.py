"""The Triton kernels of the MoE ops with their parameters in the order TensorRT launches AOT plugins.

A ``tensorrt.plugin`` AOT plugin launches exactly one kernel, whose parameters are the
plugin's input pointers, then the int32 scalars it returns as ``extra_args``, then its output
pointers ("Symbolic expressions for scalar inputs to the kernel, located after the tensor inputs
and before the tensor outputs": ``tensorrt.plugin.aot_impl``'s docstring in
``python/packaging/bindings_wheel/tensorrt/plugin/_lib.py``; ``circ_pad_kernel`` in
``samples/python/quickly_deployable_plugins/oait_kernels.py`` is laid out the same way).
Every scalar that is not a shape (the routing ``scale``, clamped SwiGLU's ``alpha`` and
``limit``, E, D, F, block sizes) is a ``tl.constexpr`` compiled in: TensorRT's extra arguments
are int32 shape expressions.

A plugin has a fixed list of inputs, so ``MoEGateUp`` and ``MoEDown`` always take a bias input;
``HAS_BIAS`` (the node's ``has_b_gate_up`` / ``has_b_down``) says whether to read it. Without it
the wrapper passes ``None`` to the op's kernel, which then computes exactly the unbiased code
(the unused pointer stays in the parameter list, where TensorRT puts it).

Each wrapper here only reorders arguments and calls the op's kernel in
``moetrt/ops/kernels/`` as a device function, so the plugins run exactly the code the torch
back end runs on CUDA. Importing this module imports triton.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moetrt.ops.kernels.sparse_moe_triton import (
    moe_align_kernel,
    moe_combine_kernel,
    moe_down_kernel,
    moe_gate_up_kernel,
)
from moetrt.ops.kernels.topk_routing_triton import topk_routing_kernel

__all__ = ["topk_routing_aot", "moe_align_aot", "moe_gate_up_aot", "moe_down_aot", "moe_combine_aot"]


@triton.jit
def topk_routing_aot(
    logits_ptr,  # in   [T, E] float32
    num_tokens,  # extra: T
    weights_ptr,  # out [T, K] float32
    indices_ptr,  # out [T, K] int32
    num_experts: tl.constexpr,
    SCALE: tl.constexpr,
    K: tl.constexpr,
    SIGMOID: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    topk_routing_kernel(
        logits_ptr, weights_ptr, indices_ptr, num_tokens, num_experts, SCALE,
        K=K, SIGMOID=SIGMOID, NORMALIZE=NORMALIZE, BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, BLOCK_K=BLOCK_K,
    )  # fmt: skip


@triton.jit
def moe_align_aot(
    indices_ptr,  # in  [T, K] int32
    num_pairs,  # extra: P = T*K
    sorted_ids_ptr,  # out [max_blocks * BLOCK_M] int32
    expert_ids_ptr,  # out [max_blocks] int32
    num_padded_ptr,  # out [1] int32
    num_experts: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    moe_align_kernel(
        indices_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr, num_pairs, num_experts,
        BLOCK_M=BLOCK_M, BLOCK_E=BLOCK_E, BLOCK_P=BLOCK_P,
    )  # fmt: skip


@triton.jit
def moe_gate_up_aot(
    x_ptr,  # in  [T, D]
    w_ptr,  # in  [E, 2F, D]
    b_ptr,  # in  [E, 2F] gate then up biases (read only if HAS_BIAS)
    sorted_ids_ptr,  # in  [max_blocks * BLOCK_M] int32
    expert_ids_ptr,  # in  [max_blocks] int32
    num_padded_ptr,  # in  [1] int32
    num_pairs,  # extra: P
    h_ptr,  # out [P, F]
    D: tl.constexpr,
    F: tl.constexpr,
    K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    ALPHA: tl.constexpr,  # None for silu
    LIMIT: tl.constexpr,  # None for silu
):
    moe_gate_up_kernel(
        x_ptr, w_ptr, b_ptr if HAS_BIAS else None, h_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr, num_pairs,
        ALPHA, LIMIT, D=D, F=F, K=K, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, UPCAST=UPCAST,
        PRECISION=PRECISION, GROUP_M=GROUP_M, ACTIVATION=ACTIVATION,
    )  # fmt: skip


@triton.jit
def moe_down_aot(
    h_ptr,  # in  [P, F]
    w_ptr,  # in  [E, D, F]
    b_ptr,  # in  [E, D] down biases (read only if HAS_BIAS)
    routing_ptr,  # in  [T, K] float32 routing weights
    sorted_ids_ptr,  # in  [max_blocks * BLOCK_M] int32
    expert_ids_ptr,  # in  [max_blocks] int32
    num_padded_ptr,  # in  [1] int32
    num_pairs,  # extra: P
    out_ptr,  # out [P, D]: routing weight * expert output per (token, slot)
    D: tl.constexpr,
    F: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    moe_down_kernel(
        h_ptr, w_ptr, b_ptr if HAS_BIAS else None, out_ptr, routing_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
        num_pairs,
        D=D, F=F, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, UPCAST=UPCAST, PRECISION=PRECISION,
        GROUP_M=GROUP_M,
    )  # fmt: skip


@triton.jit
def moe_combine_aot(
    slots_ptr,  # in  [P, D] = [T, K, D]
    indices_ptr,  # in  [T, K] int32
    y_ptr,  # out [T, D]
    num_experts: tl.constexpr,
    D: tl.constexpr,
    K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    moe_combine_kernel(slots_ptr, indices_ptr, y_ptr, num_experts, D=D, K=K, BLOCK_D=BLOCK_D)
