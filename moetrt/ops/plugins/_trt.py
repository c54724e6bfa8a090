"""The ``tensorrt.plugin`` definitions of the moetrt plugins; importing this module registers them.

Import it through :func:`moetrt.ops.plugins.register_plugins` (this module imports tensorrt).
Written against TensorRT's own sources, which nothing on a machine without TensorRT can run:

- ``@trtp.register`` / ``@trtp.impl`` / ``@trtp.aot_impl`` as in
  ``samples/python/quickly_deployable_plugins/qdp_defs.py`` (``circ_pad_plugin``: a register
  function building outputs from ``shape_expr``, a JIT impl launching Triton through torch on
  TensorRT's stream, an AOT impl returning ``(kernel name, PTX, KernelLaunchParams,
  SymIntExprs)``);
- the rules of ``python/packaging/bindings_wheel/tensorrt/plugin/``: register functions take
  no default values (``_validate.py``); ``_TemplateAOTPlugin.get_launch_params``
  (``_plugin_class.py``) passes EVERY attribute, positionally in registration order, to the
  AOT impl, so each AOT impl declares all of its plugin's attributes; ``Tensor`` refuses
  ``__cuda_array_interface__`` for BF16 (``_tensor.py``), so bf16 buffers are viewed through int16.
- the ONNX parser hands a ``tensorrt.plugin`` creator the node attributes its register function
  declares (INT attributes as int32, FLOAT as float32, STRING as text with a trailing NUL, which
  :func:`moetrt.ops.plugins.aot.attribute_text` drops) and picks the AOT or the JIT
  implementation from the node's ``aot`` attribute (1: strict AOT, 0: strict JIT).
"""

# No ``from __future__ import annotations`` here: tensorrt.plugin validates the annotations as
# objects (``issubclass(param.annotation, TensorDesc)`` in _validate.py), not as strings.
from types import SimpleNamespace
from typing import Tuple, Union

import tensorrt as trt
import tensorrt.plugin as trtp

from moetrt.ops.plugins import aot

# symbolic versions of the launch-formula operators in moetrt.ops.plugins.aot
_OPS = SimpleNamespace(cdiv=trtp.cdiv, min=trtp.min, max=trtp.max)
_KERNEL_DTYPES = {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16"}
AotResult = Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]


# --- helpers -----------------------------------------------------------------------------------
class _CudaArray:
    """A ``__cuda_array_interface__`` over a plugin buffer, for dtypes ``trtp.Tensor`` refuses (bf16)."""

    def __init__(self, tensor: trtp.Tensor, typestr: str, itemsize: int):
        self.__cuda_array_interface__ = {
            "shape": tuple(tensor.shape), "typestr": typestr, "data": (tensor.data_ptr, False), "version": 3,
            "strides": tuple(s * itemsize for s in tensor.strides), "stream": None,
        }


def _as_torch(tensor: trtp.Tensor):
    """A torch view (no copy) of a plugin input/output buffer on the GPU."""
    import torch

    if tensor.dtype == trt.bfloat16:
        return torch.as_tensor(_CudaArray(tensor, "<i2", 2), device="cuda").view(torch.bfloat16)
    return torch.as_tensor(tensor, device="cuda")


def _kernel_dtype(desc: trtp.TensorDesc, what: str) -> str:
    if desc.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"moetrt plugins: {what} must be float32, float16 or bfloat16, got {desc.dtype}")
    return _KERNEL_DTYPES[desc.dtype]


def _static_dim(desc: trtp.TensorDesc, axis: int, what: str) -> int:
    value = desc.shape[axis]
    if value < 0:
        raise ValueError(f"moetrt plugins: {what} must be static in the network (a model constant), got a dynamic dimension")
    return int(value)


def _capability() -> tuple[int, int]:
    from moetrt.ops.plugins import device_info

    return device_info()["capability"]


def _aot_result(kernel: aot.AotKernel, num_tokens, extras: list) -> AotResult:
    """Compile ``kernel`` for this GPU and describe its launch for ``num_tokens`` (a shape expression)."""
    compiled = aot.compile_aot_kernel(kernel, _capability())
    grid = aot.launch_grid(kernel, num_tokens, _OPS)
    params = trtp.KernelLaunchParams()
    params.grid_x, params.grid_y, params.grid_z = grid
    params.block_x = compiled.block
    params.shared_mem = compiled.shared
    extra_args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in extras])
    assert len(extras) == len(kernel.extras), (kernel.plugin, extras)
    return compiled.entry.encode(), compiled.ptx.encode(), params, extra_args


# --- moetrt::TopKRouting ------------------------------------------------------------------------
@trtp.register("moetrt::TopKRouting")
def topk_routing_desc(
    logits: trtp.TensorDesc, k: int, scoring: str, normalize: int, scale: float
) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
    tokens = logits.shape_expr[0]  # T
    weights = trtp.from_shape_expr((tokens, k), dtype=trt.float32)  # [T, K]
    indices = trtp.from_shape_expr((tokens, k), dtype=trt.int32)  # [T, K]
    return weights, indices


@trtp.impl("moetrt::TopKRouting")
def topk_routing_impl(
    logits: trtp.Tensor, k: int, scoring: str, normalize: int, scale: float, outputs: Tuple[trtp.Tensor], stream: int
) -> None:
    import torch

    from moetrt.ops.kernels.topk_routing_triton import topk_routing_triton

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        weights, indices = topk_routing_triton(_as_torch(logits), k, aot.attribute_text(scoring), int(normalize), scale)
        _as_torch(outputs[0]).copy_(weights)
        _as_torch(outputs[1]).copy_(indices)


@trtp.aot_impl("moetrt::TopKRouting")
def topk_routing_aot_impl(
    logits: trtp.TensorDesc, k: int, scoring: str, normalize: int, scale: float, outputs: Tuple[trtp.TensorDesc],
    tactic: int,
) -> AotResult:
    num_experts = _static_dim(logits, 1, "TopKRouting's expert count (logits [T, E])")
    kernel = aot.topk_routing_aot_kernel(num_experts, k, scoring, int(normalize), scale)
    tokens = logits.shape_expr[0]
    return _aot_result(kernel, tokens, [tokens])


# --- moetrt::SparseMoE (JIT: four Triton kernels launched from Python) ----------------------------
# The biases are always inputs (a plugin's inputs are fixed); has_b_gate_up / has_b_down say whether
# they are the node's or the one-element placeholders the graph rewrite feeds in their place.
@trtp.register("moetrt::SparseMoE")
def sparse_moe_desc(
    x: trtp.TensorDesc, weights: trtp.TensorDesc, indices: trtp.TensorDesc, w_gate_up: trtp.TensorDesc,
    w_down: trtp.TensorDesc, b_gate_up: trtp.TensorDesc, b_down: trtp.TensorDesc, activation: str, alpha: float,
    limit: float, has_b_gate_up: int, has_b_down: int,
) -> trtp.TensorDesc:
    return x.like()  # y [T, D] in x's dtype


@trtp.impl("moetrt::SparseMoE")
def sparse_moe_impl(
    x: trtp.Tensor, weights: trtp.Tensor, indices: trtp.Tensor, w_gate_up: trtp.Tensor, w_down: trtp.Tensor,
    b_gate_up: trtp.Tensor, b_down: trtp.Tensor, activation: str, alpha: float, limit: float, has_b_gate_up: int,
    has_b_down: int, outputs: Tuple[trtp.Tensor], stream: int,
) -> None:
    import torch

    from moetrt.ops.kernels.sparse_moe_triton import sparse_moe_triton

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        y = sparse_moe_triton(_as_torch(x), _as_torch(weights), _as_torch(indices), _as_torch(w_gate_up),
                              _as_torch(w_down), _as_torch(b_gate_up) if has_b_gate_up else None,
                              _as_torch(b_down) if has_b_down else None, aot.attribute_text(activation), alpha, limit)
        _as_torch(outputs[0]).copy_(y)


# --- SparseMoE as four AOT plugins ---------------------------------------------------------------
@trtp.register("moetrt::MoEAlign")
def moe_align_desc(
    indices: trtp.TensorDesc, num_experts: int, k: int, block_m: int
) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
    pairs = indices.shape_expr[0] * k  # P = T*K
    blocks = aot.max_blocks(pairs, num_experts, block_m, _OPS)
    sorted_ids = trtp.from_shape_expr((blocks * block_m,), dtype=trt.int32)  # [max_blocks * BM]
    expert_ids = trtp.from_shape_expr((blocks,), dtype=trt.int32)  # [max_blocks]
    num_padded = trtp.from_shape_expr((1,), dtype=trt.int32)  # [1]
    return sorted_ids, expert_ids, num_padded


@trtp.aot_impl("moetrt::MoEAlign")
def moe_align_aot_impl(
    indices: trtp.TensorDesc, num_experts: int, k: int, block_m: int, outputs: Tuple[trtp.TensorDesc], tactic: int
) -> AotResult:
    kernel = aot.moe_align_aot_kernel(num_experts, k, block_m)
    tokens = indices.shape_expr[0]
    return _aot_result(kernel, tokens, [tokens * k])


@trtp.register("moetrt::MoEGateUp")
def moe_gate_up_desc(
    x: trtp.TensorDesc, w_gate_up: trtp.TensorDesc, b_gate_up: trtp.TensorDesc, sorted_ids: trtp.TensorDesc,
    expert_ids: trtp.TensorDesc, num_padded: trtp.TensorDesc, num_experts: int, hidden_size: int, ffn: int, k: int,
    block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int, group_m: int, activation: str,
    alpha: float, limit: float, has_b_gate_up: int,
) -> trtp.TensorDesc:
    return trtp.from_shape_expr((x.shape_expr[0] * k, ffn), dtype=x.dtype)  # h [P, F]


@trtp.aot_impl("moetrt::MoEGateUp")
def moe_gate_up_aot_impl(
    x: trtp.TensorDesc, w_gate_up: trtp.TensorDesc, b_gate_up: trtp.TensorDesc, sorted_ids: trtp.TensorDesc,
    expert_ids: trtp.TensorDesc, num_padded: trtp.TensorDesc, num_experts: int, hidden_size: int, ffn: int, k: int,
    block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int, group_m: int, activation: str,
    alpha: float, limit: float, has_b_gate_up: int, outputs: Tuple[trtp.TensorDesc], tactic: int,
) -> AotResult:
    kernel = aot.moe_gate_up_aot_kernel(_kernel_dtype(x, "SparseMoE's x"), num_experts, hidden_size, ffn, k, block_m,
                                        block_n, block_k, num_warps, num_stages, group_m, activation, alpha, limit,
                                        has_b_gate_up)
    tokens = x.shape_expr[0]
    return _aot_result(kernel, tokens, [tokens * k])


@trtp.register("moetrt::MoEDown")
def moe_down_desc(
    h: trtp.TensorDesc, w_down: trtp.TensorDesc, b_down: trtp.TensorDesc, weights: trtp.TensorDesc,
    sorted_ids: trtp.TensorDesc, expert_ids: trtp.TensorDesc, num_padded: trtp.TensorDesc, num_experts: int,
    hidden_size: int, ffn: int, k: int, block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int,
    group_m: int, has_b_down: int,
) -> trtp.TensorDesc:
    return trtp.from_shape_expr((h.shape_expr[0], hidden_size), dtype=h.dtype)  # slots [P, D]


@trtp.aot_impl("moetrt::MoEDown")
def moe_down_aot_impl(
    h: trtp.TensorDesc, w_down: trtp.TensorDesc, b_down: trtp.TensorDesc, weights: trtp.TensorDesc,
    sorted_ids: trtp.TensorDesc, expert_ids: trtp.TensorDesc, num_padded: trtp.TensorDesc, num_experts: int,
    hidden_size: int, ffn: int, k: int, block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int,
    group_m: int, has_b_down: int, outputs: Tuple[trtp.TensorDesc], tactic: int,
) -> AotResult:
    kernel = aot.moe_down_aot_kernel(_kernel_dtype(h, "SparseMoE's x"), num_experts, hidden_size, ffn, k, block_m,
                                     block_n, block_k, num_warps, num_stages, group_m, has_b_down)
    tokens = weights.shape_expr[0]  # routing weights [T, K]
    return _aot_result(kernel, tokens, [tokens * k])


@trtp.register("moetrt::MoECombine")
def moe_combine_desc(
    slots: trtp.TensorDesc, indices: trtp.TensorDesc, num_experts: int, hidden_size: int, k: int, block_d: int
) -> trtp.TensorDesc:
    return trtp.from_shape_expr((indices.shape_expr[0], hidden_size), dtype=slots.dtype)  # y [T, D]


@trtp.aot_impl("moetrt::MoECombine")
def moe_combine_aot_impl(
    slots: trtp.TensorDesc, indices: trtp.TensorDesc, num_experts: int, hidden_size: int, k: int, block_d: int,
    outputs: Tuple[trtp.TensorDesc], tactic: int,
) -> AotResult:
    kernel = aot.moe_combine_aot_kernel(_kernel_dtype(slots, "SparseMoE's x"), num_experts, hidden_size, k, block_d)
    return _aot_result(kernel, indices.shape_expr[0], [])
