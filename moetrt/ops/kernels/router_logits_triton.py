"""Triton kernel of the router's logits: ``x.float() @ weight.float().T (+ bias.float())`` reading ``x`` once.

The model defines the router in float32 whatever its dtype (``moetrt/model.py``): on a bf16 model
the plain PyTorch form is three kernels, an fp32 copy of ``x`` (``T x D x 4`` bytes written, then
read again by the matmul), an fp32 copy of the gate weight and the fp32 matmul. At Mixtral sizes
and T = 4096 that is ~0.2 ms of a 5.8 ms MoE block. This kernel loads the model-dtype tiles,
converts them in registers (bf16 and fp16 convert to fp32 exactly) and accumulates the products
in fp32: the same products as the PyTorch form, summed in another order. A router bias (gpt-oss's
router is ``F.linear(x, W, b)``) is added in fp32 after the sum; without one the kernel is compiled
with ``b_ptr=None`` and is the same code as before routers had biases.

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
    b_ptr,  # [E] router bias; None: no bias
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
    if b_ptr is not None:
        acc += tl.load(b_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)[None, :]  # [BT, BE]
    tl.store(out_ptr + rows[:, None] * E + offs_e[None, :], acc, mask=t_ok[:, None] & e_ok[None, :])


def router_logits_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x.float(), weight.float(), bias)`` as one kernel: fp32 ``[T, E]`` from ``x [T, D]``,
    ``weight [E, D]`` and the optional ``bias [E]`` (added in fp32).

    ``x``, ``weight`` and ``bias`` may be bf16, fp16 or fp32 (not necessarily the same). Runs on CUDA
    tensors, or on CPU tensors in Triton's interpreter; nothing here waits for the host, so a CUDA
    graph can capture it.
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"router logits take x [T, D] and weight [E, D] with the same D, got x {list(x.shape)} and "
            f"weight {list(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"router logits: bias must be [E={weight.shape[0]}], got {list(bias.shape)}")
    for name, tensor in (("x", x), ("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"router logits: {name} must be bf16, fp16 or fp32, got {tensor.dtype}")
    check_device(*(t for t in (x, weight, bias) if t is not None))
    num_tokens, dim = x.shape
    num_experts = weight.shape[0]
    out = torch.empty(num_tokens, num_experts, dtype=torch.float32, device=x.device)
    if num_tokens == 0 or num_experts == 0:
        return out
    if dim == 0:
        return out.zero_() if bias is None else out.copy_(bias.float().expand_as(out))
    x, weight = x.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()  # None: the kernel is compiled without it
    block_t, block_e, block_k, use_dot, num_warps = router_logits_blocks(num_tokens, num_experts, dim)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(num_experts, block_e))
    router_logits_kernel[grid](
        x, weight, bias, out, num_tokens, D=dim, E=num_experts,
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=block_k, USE_DOT=use_dot, num_warps=num_warps,
    )  # fmt: skip
    return out
