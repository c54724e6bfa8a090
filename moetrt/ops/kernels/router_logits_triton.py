"""Triton kernel of the router's logits: ``x.float() @ weight.float().T`` reading ``x`` once.

The model defines the router in float32 whatever its dtype (``moetrt/model.py``): on a bf16 model
the plain PyTorch form is three kernels, an fp32 copy of ``x`` (``T x D x 4`` bytes written, then
read again by the matmul), an fp32 copy of the gate weight and the fp32 matmul. At Mixtral sizes
and T = 4096 that is ~0.2 ms of a 5.8 ms MoE block. This kernel loads the model-dtype tiles,
converts them in registers (bf16 and fp16 convert to fp32 exactly) and accumulates the products
in fp32: the same products as the PyTorch form, summed in another order.

Two inner products, picked by ``configs.router_logits_blocks``:

* ``USE_DOT``: ``tl.dot`` on fp32 tiles with ``input_precision="ieee"`` (fp32 FMA, no TF32), for
  16 or more tokens and experts, where the dot's 16-row minimum wastes nothing much;
* otherwise broadcast products ``[BT, BE, BK]`` accumulated over the K loop and summed once at the
  end, for a decode step's few tokens and for fewer than 16 experts: no 16-row minimum.

Importing this module imports triton; ``moetrt`` itself never does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moetrt.ops.kernels._util import check_device
from moetrt.ops.kernels.configs import router_logits_blocks

__all__ = ["router_logits_triton", "router_logits_kernel"]


@triton.jit
def router_logits_kernel(
    x_ptr,  # [T, D] model dtype, rows contiguous
    w_ptr,  # [E, D] gate weight, rows contiguous
    out_ptr,  # [T, E] float32 out
    num_tokens,  # T
    D: tl.constexpr,
    E: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)  # [BE]
    t_ok = offs_t < num_tokens
    e_ok = offs_e < E
    rows = offs_t.to(tl.int64)
    if USE_DOT:
        acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_T, BLOCK_E, BLOCK_K), dtype=tl.float32)  # running products, summed after the loop
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        k_ok = offs_k < D
        a = tl.load(x_ptr + rows[:, None] * D + offs_k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        if USE_DOT:
            b = tl.load(w_ptr + offs_e[None, :] * D + offs_k[:, None], mask=k_ok[:, None] & e_ok[None, :], other=0.0)
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")  # [BT, BK] @ [BK, BE]
        else:
            b = tl.load(w_ptr + offs_e[:, None] * D + offs_k[None, :], mask=e_ok[:, None] & k_ok[None, :], other=0.0)
            acc += a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :]  # [BT, BE, BK]
    if not USE_DOT:
        acc = tl.sum(acc, axis=2)  # [BT, BE], one reduction after the loop
    tl.store(out_ptr + rows[:, None] * E + offs_e[None, :], acc, mask=t_ok[:, None] & e_ok[None, :])


def router_logits_triton(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x.float(), weight.float())`` as one kernel: fp32 ``[T, E]`` from ``x [T, D]``, ``weight [E, D]``.

    ``x`` and ``weight`` may be bf16, fp16 or fp32 (not necessarily the same). Runs on CUDA tensors,
    or on CPU tensors in Triton's interpreter; nothing here waits for the host, so a CUDA graph can
    capture it.
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"router logits take x [T, D] and weight [E, D] with the same D, got x {list(x.shape)} and "
            f"weight {list(weight.shape)}"
        )
    for name, tensor in (("x", x), ("weight", weight)):
        if tensor.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"router logits: {name} must be bf16, fp16 or fp32, got {tensor.dtype}")
    check_device(x, weight)
    num_tokens, dim = x.shape
    num_experts = weight.shape[0]
    out = torch.empty(num_tokens, num_experts, dtype=torch.float32, device=x.device)
    if num_tokens == 0 or num_experts == 0:
        return out
    if dim == 0:
        return out.zero_()
    x, weight = x.contiguous(), weight.contiguous()
    block_t, block_e, block_k, use_dot, num_warps = router_logits_blocks(num_tokens, num_experts, dim)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(num_experts, block_e))
    router_logits_kernel[grid](
        x, weight, out, num_tokens, D=dim, E=num_experts,
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=block_k, USE_DOT=use_dot, num_warps=num_warps,
    )  # fmt: skip
    return out
