"""Triton kernel of ``moetrt::TopKRouting``: scores, top-k, normalize and scale in one pass.

Semantics are the op's (``moetrt/ops/topk_routing.py``): ``scores = softmax(logits)`` or
``sigmoid(logits)`` in float32, the ``k`` largest scores sorted descending with ties to the
lower expert index, ``weights = scores[indices]``, optionally divided by their sum (``normalize=1``)
or their Euclidean norm (``normalize=2``), times ``scale``. One program handles ``BLOCK_T`` tokens and all ``E`` experts of each (``E`` up to a
few hundred fits in registers); the top-k is ``k`` rounds of "take the row maximum, lowest index
among equals, then knock it out", which gives exactly the stable-sort order the op defines.

NaN scores rank above every number (as ``torch.sort`` ranks them) and keep their NaN weight, so
a NaN logit shows up in the output instead of turning into an out-of-range expert index.

``sparsemixer`` (PhiMoE, version 3) has its own kernel, ``sparsemixer_routing_kernel``: two rounds
of "the row maximum, lowest index among equals", each weighted by its softmax over the logits within
a relative ``2 * jitter_eps`` of that maximum (the op's definition, mask for mask).

Importing this module imports triton; ``moetrt`` itself never does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moetrt.ops.kernels._util import check_device
from moetrt.ops.kernels.configs import next_power_of_2, topk_routing_blocks
from moetrt.ops.topk_routing import _check

__all__ = ["topk_routing_triton", "topk_routing_kernel", "sparsemixer_routing_kernel"]


@triton.jit
def _logits_tile(logits_ptr, num_tokens, num_experts, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """This program's ``BLOCK_T`` rows of logits ``[BT, BE]`` (0 outside), their row numbers and lane masks."""
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    offs_e = tl.arange(0, BLOCK_E)  # [BE]
    t_ok = offs_t < num_tokens
    e_ok = offs_e < num_experts
    rows = offs_t.to(tl.int64)
    logits = tl.load(
        logits_ptr + rows[:, None] * num_experts + offs_e[None, :], mask=t_ok[:, None] & e_ok[None, :], other=0.0
    )  # [BT, BE]
    return logits, rows, offs_e, t_ok, e_ok


@triton.jit
def topk_routing_kernel(
    logits_ptr,  # [T, E] float32, rows contiguous
    weights_ptr,  # [T, K] float32 out
    indices_ptr,  # [T, K] int32 out
    num_tokens,  # T
    num_experts,  # E
    scale,  # float32
    K: tl.constexpr,
    SIGMOID: tl.constexpr,  # False: softmax
    NORMALIZE: tl.constexpr,  # 0: none, 1: divide by the sum, 2: by the Euclidean norm
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,  # next power of two >= E
    BLOCK_K: tl.constexpr,  # next power of two >= K
):
    logits, rows, offs_e, t_ok, e_ok = _logits_tile(logits_ptr, num_tokens, num_experts, BLOCK_T, BLOCK_E)  # [BT, BE]
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    if SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-logits))
    else:
        logits = tl.where(e_ok[None, :], logits, float("-inf"))
        shifted = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        scores = shifted / tl.sum(shifted, axis=1)[:, None]  # [BT, BE]

    # Selection key: the score, NaN ranked first, padding lanes last.
    key = tl.where(scores == scores, scores, float("inf"))
    key = tl.where(e_ok[None, :], key, float("-inf"))
    top_weights = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    top_indices = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for j in tl.static_range(K):
        best = tl.max(key, axis=1)  # [BT]
        idx = tl.min(tl.where(key == best[:, None], offs_e[None, :], BLOCK_E), axis=1)  # [BT] lowest index among ties
        chosen = offs_e[None, :] == idx[:, None]  # [BT, BE] one lane per row
        weight = tl.sum(tl.where(chosen, scores, 0.0), axis=1)  # [BT] the score itself (adding zeros is exact)
        top_weights = tl.where(offs_k[None, :] == j, weight[:, None], top_weights)
        top_indices = tl.where(offs_k[None, :] == j, idx[:, None], top_indices)
        key = tl.where(chosen, float("-inf"), key)

    if NORMALIZE == 2:
        top_weights = top_weights / tl.sqrt(tl.sum(top_weights * top_weights, axis=1))[:, None]  # lanes >= K hold 0
    elif NORMALIZE:
        top_weights = top_weights / tl.sum(top_weights, axis=1)[:, None]  # lanes >= K hold 0
    top_weights = top_weights * scale

    out_offs = rows[:, None] * K + offs_k[None, :]
    out_ok = t_ok[:, None] & (offs_k[None, :] < K)
    tl.store(weights_ptr + out_offs, top_weights, mask=out_ok)
    tl.store(indices_ptr + out_offs, top_indices, mask=out_ok)


@triton.jit
def sparsemixer_routing_kernel(
    logits_ptr,  # [T, E] float32, rows contiguous
    weights_ptr,  # [T, 2] float32 out
    indices_ptr,  # [T, 2] int32 out
    num_tokens,  # T
    num_experts,  # E
    scale,  # float32
    threshold,  # float32: 2 * jitter_eps
    NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,  # next power of two >= E
):
    logits, rows, offs_e, t_ok, e_ok = _logits_tile(logits_ptr, num_tokens, num_experts, BLOCK_T, BLOCK_E)  # [BT, BE]
    logits = tl.where(e_ok[None, :], logits, float("-inf"))  # padding lanes never win and weigh nothing
    magnitude = tl.abs(logits)

    # first pick: the row maximum, the lowest index among equals; its softmax over the logits within 2 eps of it
    best1 = tl.max(logits, axis=1)  # [BT]
    idx1 = tl.min(tl.where(logits == best1[:, None], offs_e[None, :], BLOCK_E), axis=1)  # [BT]
    ratio = (best1[:, None] - logits) / tl.maximum(magnitude, best1[:, None])  # [BT, BE]
    keep = (ratio <= threshold) | (ratio != ratio)  # not (ratio > threshold): a NaN ratio keeps, as in the op
    kept = tl.where(keep, logits, float("-inf"))  # padding lanes stay -inf
    w1 = 1.0 / tl.sum(tl.exp(kept - best1[:, None]), axis=1)  # [BT] exp(0) over the sum: the pick's softmax
    chosen1 = offs_e[None, :] == idx1[:, None]

    # second pick: the same over the others (the first masked out)
    rest = tl.where(chosen1, float("-inf"), logits)
    best2 = tl.max(rest, axis=1)  # [BT]
    idx2 = tl.min(tl.where(rest == best2[:, None], offs_e[None, :], BLOCK_E), axis=1)  # [BT]
    ratio2 = (best2[:, None] - logits) / tl.maximum(magnitude, best2[:, None])  # [BT, BE]
    keep2 = (ratio2 <= threshold) | (ratio2 != ratio2)
    kept2 = tl.where(keep2, rest, float("-inf"))  # the first pick and padding lanes stay -inf
    w2 = 1.0 / tl.sum(tl.exp(kept2 - best2[:, None]), axis=1)  # [BT]

    if NORMALIZE:
        total = w1 + w2
        w1 = w1 / total
        w2 = w2 / total
    out = rows * 2
    tl.store(weights_ptr + out, w1 * scale, mask=t_ok)
    tl.store(weights_ptr + out + 1, w2 * scale, mask=t_ok)
    tl.store(indices_ptr + out, idx1, mask=t_ok)
    tl.store(indices_ptr + out + 1, idx2, mask=t_ok)


def topk_routing_triton(
    logits: torch.Tensor, k: int, scoring: str = "softmax", normalize: int = 0, scale: float = 1.0,
    selection_bias: torch.Tensor | None = None, n_group: int = 1, topk_group: int = 1,
    group_scoring: str = "top2_sum", norm_min: float = 0.0, jitter_eps: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``moetrt::TopKRouting`` on the Triton kernel: ``(weights f32 [T, k], indices i32 [T, k])``.

    Runs on CUDA tensors, or on CPU tensors when triton runs in its interpreter
    (``TRITON_INTERPRET=1`` set before triton is imported). Arguments are checked as the op
    checks them; nothing here synchronizes with the host, so a CUDA graph can capture it.

    The kernel implements version 1 and sparsemixer (version 4): a selection bias or groups (version 2),
    ``norm_min`` (version 3) or sparsemixer's weights divided by their Euclidean norm raise ValueError
    naming them, never ignored.
    """
    _check(logits, k, scoring, selection_bias, n_group, topk_group, group_scoring, norm_min, normalize, jitter_eps)
    unsupported = (["selection_bias"] * (selection_bias is not None) + [f"n_group={n_group}"] * (n_group != 1)
                   + [f"topk_group={topk_group}"] * (topk_group != 1)
                   + [f"group_scoring={group_scoring!r}"] * (group_scoring != "top2_sum")
                   + [f"norm_min={norm_min!r}"] * (normalize and norm_min != 0.0)
                   + ["normalize=2 with scoring 'sparsemixer'"] * (scoring == "sparsemixer" and int(normalize) == 2))
    if unsupported:
        raise ValueError(
            f"TopKRouting's Triton kernel does not implement {', '.join(unsupported)} (TopKRouting versions 2 and 3: "
            "selection bias, groups, norm_min); run this model's router with the PyTorch op (do not call "
            "moetrt.ops.kernels.maybe_register_cuda_kernels) or on the CPU")
    check_device(logits)
    num_tokens, num_experts = logits.shape

    logits = logits.contiguous()
    weights = torch.empty(num_tokens, k, dtype=torch.float32, device=logits.device)
    indices = torch.empty(num_tokens, k, dtype=torch.int32, device=logits.device)
    if num_tokens == 0:
        return weights, indices
    block_t, block_e, num_warps = topk_routing_blocks(num_tokens, num_experts)
    grid = (triton.cdiv(num_tokens, block_t),)
    if scoring == "sparsemixer":
        # the threshold as the op compares it: float32(2 * jitter_eps)
        threshold = float(torch.tensor(2 * jitter_eps, dtype=torch.float32))
        sparsemixer_routing_kernel[grid](
            logits, weights, indices, num_tokens, num_experts, float(scale), threshold,
            NORMALIZE=bool(normalize), BLOCK_T=block_t, BLOCK_E=block_e, num_warps=num_warps,
        )  # fmt: skip
        return weights, indices
    topk_routing_kernel[grid](
        logits, weights, indices, num_tokens, num_experts, float(scale),
        K=k, SIGMOID=scoring == "sigmoid", NORMALIZE=int(normalize),
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=next_power_of_2(k),
        num_warps=num_warps,
    )  # fmt: skip
    return weights, indices
