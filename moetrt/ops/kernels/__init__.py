"""Triton kernels of the two MoE ops, for the torch back end on CUDA and the TensorRT plugins.

* ``topk_routing_triton.topk_routing_triton``: ``moetrt::TopKRouting`` fused (scores, top-k,
  normalize, scale); version-2 and -3 calls (selection bias, groups, norm_min) take the op's PyTorch
  composite.
* ``sparse_moe_triton.sparse_moe_triton``: ``moetrt::SparseMoE`` as align by expert, grouped
  GEMM gate|up with the SwiGLU epilogue, grouped GEMM down with the routing weight,
  deterministic combine.
* ``router_logits_triton.router_logits_triton``: the router's fp32 logits read from the
  model-dtype activations in one pass (``router_logits`` below picks it on CUDA).
* ``compile.compile_for_sm90``: the same kernels compiled ahead of time to PTX (and cubin) for
  sm_90 on a machine without a GPU, for the TensorRT plugins.
* ``maybe_register_cuda_kernels``: make ``torch.ops.moetrt.*`` and ``router_logits`` run these
  kernels on CUDA.

triton is optional (``pip install moetrt[gpu]``): this module imports it only when a kernel is
first called, so ``import moetrt.ops.kernels`` works without it. On the CPU the kernels run in
Triton's interpreter when ``TRITON_INTERPRET=1`` is set before triton is imported (that is how
the tests check them on machines without a GPU).
"""

from __future__ import annotations

import importlib.util
import sys

import torch
import torch.nn.functional as F

__all__ = [
    "maybe_register_cuda_kernels",
    "router_logits",
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


def _topk_routing_cuda(logits, k, scoring="softmax", normalize=False, scale=1.0, selection_bias=None, n_group=1,
                       topk_group=1, group_scoring="top2_sum", norm_min=0.0, jitter_eps=0.01):
    # the op's arguments in schema order. The kernel implements version 1 and sparsemixer: a version-2 or -3 call (a
    # selection bias, groups, norm_min) runs the op's PyTorch composite on the GPU instead (the kernel would refuse it
    # by name)
    if selection_bias is not None or n_group != 1 or norm_min:
        from moetrt.ops.topk_routing import _topk_routing

        return _topk_routing(logits, k, scoring, normalize, scale, selection_bias, n_group, topk_group, group_scoring,
                             norm_min, jitter_eps)
    from moetrt.ops.kernels.topk_routing_triton import topk_routing_triton

    return topk_routing_triton(logits, k, scoring, normalize, scale, jitter_eps=jitter_eps)


def _sparse_moe_cuda(*args, **kwargs):
    # sparse_moe_triton takes the op's arguments (x, weights, indices, w_gate_up, w_down, b_gate_up,
    # b_down, activation, alpha, limit, weight_input) as the dispatcher passes them
    from moetrt.ops.kernels.sparse_moe_triton import sparse_moe_triton

    return sparse_moe_triton(*args, **kwargs)


def _router_logits_cuda(x, weight, bias=None):
    from moetrt.ops.kernels.router_logits_triton import router_logits_triton

    return router_logits_triton(x, weight, bias)


def _router_logits_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    # without a bias exactly the form exports have always traced (byte-identical graphs)
    if bias is None:
        return F.linear(x.float(), weight.float())
    return F.linear(x.float(), weight.float(), bias.float())


def router_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The router's logits as the model defines them: ``F.linear(x.float(), weight.float()[, bias.float()])``,
    fp32 ``[T, E]`` (gpt-oss's router has a bias; the others have none).

    Once ``maybe_register_cuda_kernels`` has run, CUDA tensors take the Triton kernel, which reads
    the model-dtype ``x`` once instead of writing and reading an fp32 copy (the same products, summed
    in another order, the bias added in fp32). Exports and everything else take the PyTorch form, so
    exported graphs keep the plain ``Cast`` + ``MatMul`` (+ ``Add``) router.
    """
    if _registered and x.is_cuda and not (torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()):
        return torch.ops.moetrt_kernels.router_logits(x, weight, bias)
    return _router_logits_torch(x, weight, bias)


def _define_router_logits_op() -> None:
    """``moetrt_kernels::router_logits``: an opaque op, so torch.compile and CUDA graphs take it whole."""
    torch.library.define("moetrt_kernels::router_logits", "(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor")
    torch.library.impl("moetrt_kernels::router_logits", "cuda", _router_logits_cuda)
    torch.library.impl("moetrt_kernels::router_logits", "cpu", _router_logits_torch)

    @torch.library.register_fake("moetrt_kernels::router_logits")
    def _(x, weight, bias=None):
        return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)


def maybe_register_cuda_kernels() -> bool:
    """Make ``torch.ops.moetrt.TopKRouting`` / ``SparseMoE`` and ``router_logits`` run the Triton kernels on CUDA.

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
    _define_router_logits_op()
    _registered = True
    return True
