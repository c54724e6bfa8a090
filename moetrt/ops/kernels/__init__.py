"""Triton kernels of the two MoE ops, for the torch back end on CUDA and the TensorRT plugins.

* ``topk_routing_triton.topk_routing_triton``: ``moetrt::TopKRouting`` fused (scores, top-k,
  normalize, scale).
* ``sparse_moe_triton.sparse_moe_triton``: ``moetrt::SparseMoE`` as align by expert, grouped
  GEMM gate|up with the SwiGLU epilogue, grouped GEMM down with the routing weight,
  deterministic combine.
* ``compile.compile_for_sm90``: the same kernels compiled ahead of time to PTX (and cubin) for
  sm_90 on a machine without a GPU, for the TensorRT plugins.
* ``maybe_register_cuda_kernels``: make ``torch.ops.moetrt.*`` run these kernels on CUDA.

triton is optional (``pip install moetrt[gpu]``): this module imports it only when a kernel is
first called, so ``import moetrt.ops.kernels`` works without it. On the CPU the kernels run in
Triton's interpreter when ``TRITON_INTERPRET=1`` is set before triton is imported (that is how
the tests check them on machines without a GPU).
"""

from __future__ import annotations

import importlib.util
import sys

import torch

__all__ = [
    "maybe_register_cuda_kernels",
    "triton_available",
    "triton_mode",
]

_registered = False


def triton_available() -> bool:
    """Whether triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_mode() -> str | None:
    """``"interpret"`` or ``"compiled"`` once triton is imported, ``None`` before.

    The mode is fixed when triton is imported (its standard library is decorated then), so a
    process runs the kernels either in the interpreter or compiled, never both.
    """
    if "triton" not in sys.modules:
        return None
    import triton
    import triton.language.standard as standard

    return "compiled" if isinstance(standard.zeros, triton.runtime.JITFunction) else "interpret"


def _topk_routing_cuda(logits, k, scoring="softmax", normalize=False, scale=1.0):
    from moetrt.ops.kernels.topk_routing_triton import topk_routing_triton

    return topk_routing_triton(logits, k, scoring, normalize, scale)


def _sparse_moe_cuda(x, weights, indices, w_gate_up, w_down, activation="silu"):
    from moetrt.ops.kernels.sparse_moe_triton import sparse_moe_triton

    return sparse_moe_triton(x, weights, indices, w_gate_up, w_down, activation)


def maybe_register_cuda_kernels() -> bool:
    """Make ``torch.ops.moetrt.TopKRouting`` / ``SparseMoE`` run the Triton kernels on CUDA tensors.

    Returns whether the kernels are registered: ``False`` when triton is not installed or a
    visible GPU is older than sm_80 (Triton's bf16 tensor-core minimum); the ops then keep their
    plain PyTorch implementation. Call it where the torch back end sets up CUDA: it queries the
    devices (initialising CUDA) but does not import triton; the first CUDA call does. CPU tensors
    are unaffected. Safe to call more than once.
    """
    global _registered
    if _registered:
        return True
    if not triton_available():
        return False
    if torch.cuda.is_available():
        if any(torch.cuda.get_device_capability(i) < (8, 0) for i in range(torch.cuda.device_count())):
            return False
    import moetrt.ops  # noqa: F401  defines the ops

    torch.library.register_kernel("moetrt::TopKRouting", "cuda", _topk_routing_cuda)
    torch.library.register_kernel("moetrt::SparseMoE", "cuda", _sparse_moe_cuda)
    _registered = True
    return True
