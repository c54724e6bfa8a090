"""Helpers shared by the kernel modules (these import triton)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["interpreting", "check_device"]


@triton.jit
def _probe():
    tl.program_id(0)


def interpreting() -> bool:
    """True when triton runs its CPU interpreter (``TRITON_INTERPRET=1`` when triton was imported)."""
    return not isinstance(_probe, triton.runtime.JITFunction)


def check_device(*tensors: torch.Tensor) -> None:
    """The compiled kernels take CUDA tensors; the interpreter takes CPU tensors."""
    allowed = ("cuda", "cpu") if interpreting() else ("cuda",)
    for tensor in tensors:
        if tensor.device.type not in allowed:
            raise ValueError(
                f"the Triton kernels run on CUDA tensors, got a {tensor.device.type} tensor; on the CPU use the "
                "torch op (torch.ops.moetrt.*), or set TRITON_INTERPRET=1 before importing triton to run the "
                "kernels in Triton's interpreter"
            )
    devices = {tensor.device for tensor in tensors}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
