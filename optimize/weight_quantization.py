"""Pass: weight-only block-wise int8/int4 of the non-expert weights -> ``com.microsoft::MatMulNBits``.

The routed experts are :mod:`~moetrt.optimize.expert_quantization`'s; this pass takes every other
linear layer whose weight is a constant initializer: the attention projections (q, k, v, o),
dense MLPs and shared experts, and ``lm_head``. At batch 1 those are read in full at every decode
step (the experts only k/E of theirs), so on bench-small they are 173 of the 528 MB one fp32
decode step reads. Left alone, and why:

- the router (the ``MatMul``/``Gemm`` whose output, through data movement only, becomes a
  ``moetrt::TopKRouting``'s logits or a fused MoE/QMoE's router input): routing decisions stay
  float32, as the reference computes them in every dtype;
- weights with fewer than :data:`MIN_OUTPUTS` output features (the shared expert's scalar gate):
  too small to matter, and a gate as much as the router is;
- the embedding table: its ``Gather`` reads one row per token, so quantizing it saves no
  bandwidth (an untied ``lm_head`` is a separate weight and is quantized).

Layout (``com.microsoft::MatMulNBits``, ``Y[..., N] = A[..., K] @ dequant(B)^T``, as ONNX Runtime's
``matmul_nbits_quantizer`` writes it):

    B             uint8 [N, k_blocks, block * bits / 8]   k_blocks = ceil(K / block), K zero-padded
    scales        [N, k_blocks]                           in A's dtype
    zero_points   uint8 [N, ceil(k_blocks * bits / 8)]    asymmetric only (4 bits: two per byte)
    bias          [N]                                     a Gemm's C

Each block of ``block`` consecutive input features of one output column has its own scale; int4
packs two values per byte, the even K index in the low nibble. ``dequant(q) = (q - zp) * scale``:

- symmetric (the default, no zero-point tensor: MatMulNBits' default zero point ``2**(bits-1)``)
  is :func:`~moetrt.optimize.expert_quantization.quantize_blockwise`'s rounding, the one QMoE
  experts get: ``scale = max|w| / qmax``, every weight off by at most ``scale / 2``;
- with zero points, the block's range ``[min(w, 0), max(w, 0)]`` maps onto ``0 .. 2**bits - 1``
  (``scale = range / (2**bits - 1)``), a finer step for blocks whose weights are one-sided.

``accuracy_level`` is MatMulNBits' attribute: 4 lets ONNX Runtime's CPU kernel round the
activations to int8 per block and run an integer GEMM (fast decode), 0 keeps them in A's dtype.
On ONNX Runtime 1.32's CPU kernels 4 is the faster at every T, so no shape needs the other: bench-small's
int4 weights, a decode step's MatMulNBits kernels alone, 1 thread, 2.5x faster at T=1 and 1.3x at T=256
(int8 weights at level 0 dequantize on every call: ~50x slower). ``optimize``'s block size per scheme is
:data:`~moetrt.optimize.targets.DEFAULT_WEIGHT_BLOCK_SIZE` (int8: 128, with the measurements).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from moetrt.dtypes import from_onnx, numpy_dtype
from moetrt.ops._onnx import DOMAIN

from ._common import ORT_DOMAIN, PassResult, SharedResult, lazy_tensor, remove_dead_code
from .expert_quantization import quantize_blockwise

__all__ = [
    "quantize_weights", "quantize_matmul_weight", "dequantize_matmul_weight", "router_nodes", "BITS", "MIN_OUTPUTS",
]

BITS = {"int8": 8, "int4": 4}
MIN_OUTPUTS = 16  # weights with fewer output features (a scalar gate) stay as they are
# ops between a router GEMM and the op that routes on its output, which only move data
_DATA_MOVEMENT = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Transpose", "Cast"}


def quantize_matmul_weight(
    w: np.ndarray, bits: int, block: int, symmetric: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """w [K, N] float -> (B uint8 [N, k_blocks, block * bits / 8], scales float32 [N, k_blocks],
    zero_points uint8 [N, ceil(k_blocks * bits / 8)] or None when symmetric)."""
    assert w.ndim == 2 and bits in (4, 8) and block >= 16 and block & (block - 1) == 0, (w.shape, bits, block)
    K, N = w.shape
    k_blocks = -(-K // block)
    wt = np.zeros((N, k_blocks * block), np.float32)  # [N, Kp]: K zero-padded to whole blocks
    wt[:, :K] = w.T
    if symmetric:
        q, scales = quantize_blockwise(wt[None], bits, block)  # [1, N, Kp * bits / 8], [1, N, k_blocks]
        return q.reshape(N, k_blocks, block * bits // 8), scales[0], None
    levels = 2**bits - 1
    blocks = wt.reshape(N, k_blocks, block)  # [N, k_blocks, block]
    low, high = np.minimum(blocks.min(-1), 0.0), np.maximum(blocks.max(-1), 0.0)  # [N, k_blocks]: 0 representable
    scales = ((high - low) / levels).astype(np.float32)
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)  # an all-zero block: any scale
    zp = np.clip(np.rint(-low / scales), 0, levels)  # [N, k_blocks]
    q = np.clip(np.rint(blocks / scales[..., None]) + zp[..., None], 0, levels).astype(np.uint8)  # [N, k_blocks, block]
    zp = zp.astype(np.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)  # [N, k_blocks, block / 2], even K in the low nibble
        if k_blocks % 2:
            zp = np.concatenate([zp, np.zeros((N, 1), np.uint8)], axis=1)
        zp = zp[:, 0::2] | (zp[:, 1::2] << 4)  # [N, ceil(k_blocks / 2)]
    return np.ascontiguousarray(q), scales, np.ascontiguousarray(zp)


def dequantize_matmul_weight(
    packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int, block: int, K: int
) -> np.ndarray:
    """The inverse of :func:`quantize_matmul_weight`: float32 [K, N]."""
    N, k_blocks, _ = packed.shape

    def unpack(a: np.ndarray) -> np.ndarray:  # 4 bits: [..., n] -> [..., 2n], low nibble first
        return np.stack([a & 0x0F, a >> 4], axis=-1).reshape(*a.shape[:-1], a.shape[-1] * 2) if bits == 4 else a

    q = unpack(packed).astype(np.float32)  # [N, k_blocks, block]
    zp = (np.full((N, k_blocks), 2 ** (bits - 1), np.float32) if zero_points is None
          else unpack(zero_points)[:, :k_blocks].astype(np.float32))  # [N, k_blocks]
    w = (q - zp[..., None]) * scales[..., None]  # [N, k_blocks, block]
    return np.ascontiguousarray(w.reshape(N, k_blocks * block)[:, :K].T)


def router_nodes(model: ir.Model) -> set[ir.Node]:
    """The GEMMs whose output routes tokens: it reaches, through data movement only, a
    ``moetrt::TopKRouting`` or the router input of a ``com.microsoft::MoE``/``QMoE`` (in subgraphs too)."""
    routed: list[ir.Value] = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if (node.domain, node.op_type) == (DOMAIN, "TopKRouting"):
            routed.append(node.inputs[0])
        elif node.domain == ORT_DOMAIN and node.op_type in ("MoE", "QMoE") and len(node.inputs) > 1:
            routed.append(node.inputs[1])
    nodes = set()
    for value in routed:
        producer = value.producer() if value is not None else None
        while producer is not None and producer.domain == "" and producer.op_type in _DATA_MOVEMENT:
            producer = producer.inputs[0].producer()
        if producer is not None and producer.domain == "" and producer.op_type in ("MatMul", "Gemm"):
            nodes.add(producer)
    return nodes


class _QuantizeLinear(pattern.RewriteRuleClassBase):
    """``MatMul(A, W)`` / ``Gemm(A, W[, C])`` with a constant 2-D W -> ``MatMulNBits``."""

    def __init__(self, op_type: str, with_bias: bool, bits: int, block: int, symmetric: bool,
                 accuracy_level: int, dtypes: tuple[ir.DataType, ...], routers: set[ir.Node], names: set[str],
                 result: PassResult):
        super().__init__(name=f"Quantize{op_type}{'Bias' if with_bias else ''}")
        self.op_type, self.with_bias = op_type, with_bias
        self.bits, self.block, self.symmetric, self.accuracy_level = bits, block, symmetric, accuracy_level
        self.dtypes, self.routers, self.result = dtypes, routers, result
        self.names = names  # the quantized initializers' name prefixes written so far (shared by the rules)

    def pattern(self, op, a, w, c):
        if self.op_type == "MatMul":
            return op.MatMul(a, w, _outputs=["y"])
        if self.with_bias:
            return op.Gemm(a, w, c, _allow_other_attributes=True, _outputs=["y"])
        return op.Gemm(a, w, _allow_other_attributes=True, _outputs=["y"])

    def _weight(self, node: ir.Node) -> tuple[int, int, bool, np.ndarray | None] | str | None:
        """(K, N, W stored as [N, K], bias [N] or None); a reason to leave a constant-weight node alone; None
        (no constant weight). Reads no weight values: those are read when the quantized weight is saved."""
        w = node.inputs[1]
        if w is None or w.const_value is None or not w.is_initializer():
            return None  # activations times activations (attention scores): not a weight
        if node in self.routers:
            return "the router: routing decisions stay float32"
        if len(w.const_value.shape) != 2:  # the tensor's own shape: the value's may be unset
            return f"a weight of rank {len(w.const_value.shape)}: MatMulNBits takes 2-D weights"
        a = node.inputs[0]
        if a.dtype not in self.dtypes:
            have = a.dtype.name.lower() if a.dtype else "of unknown type"
            return f"activations {have}: this target runs MatMulNBits in {', '.join(d.name.lower() for d in self.dtypes)}"
        K, N = w.const_value.shape
        transposed = False
        bias = None
        if node.op_type == "Gemm":
            attrs = node.attributes
            if attrs.get("transA") is not None and attrs["transA"].as_int():
                return "Gemm with transA=1"
            if any(attrs.get(n) is not None and attrs[n].as_float() != 1.0 for n in ("alpha", "beta")):
                return "Gemm with alpha or beta != 1"
            if a.shape is not None and len(a.shape) != 2:
                return f"Gemm on a rank-{len(a.shape)} input"
            if attrs.get("transB") is not None and attrs["transB"].as_int():
                K, N, transposed = N, K, True  # W is [N, K]
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                c = node.inputs[2]
                if c.const_value is None or c.const_value.numpy().size != N:
                    return "a Gemm bias that is not a constant of N values"
                bias = c.const_value.numpy().reshape(-1)
        if N < MIN_OUTPUTS:
            return f"N={N} outputs (< {MIN_OUTPUTS}): a gate, too small to matter"
        return K, N, transposed, bias

    def check(self, context, y, **_):
        check = pattern.MatchResult()
        node = y.producer()
        weight = self._weight(node)
        if weight is None:
            return check.fail("no constant weight")
        if isinstance(weight, str):
            self.result.skipped[node.name or node.op_type] = weight
            return check.fail(weight)
        return check

    def rewrite(self, op, a, w, y, c=None, **_):
        node = y.producer()
        K, N, transposed, bias = self._weight(node)
        bits, block, symmetric, dtype, source = self.bits, self.block, self.symmetric, a.dtype, w.const_value
        prefix = f"{w.name}.q{self.bits}"
        if prefix in self.names:  # a weight shared by several linear layers: one copy each
            prefix = f"{prefix}.{len(self.names)}"
        self.names.add(prefix)

        def quantize():  # when saved: the packed weight, its scales (and zero points) from one computation
            array = source.numpy()  # [K, N], or [N, K] for a Gemm with transB
            array = array.T if transposed else array
            packed, scales, zero_points = quantize_matmul_weight(array, bits, block, symmetric)
            return packed, _as_dtype(scales, dtype), zero_points

        k_blocks = -(-K // block)
        shapes = {"": (N, k_blocks, block * bits // 8), ".scales": (N, k_blocks),
                  ".zero_points": (N, -(-k_blocks * bits // 8))}  # B, scales, zero points as in the module doc
        types = {"": ir.DataType.UINT8, ".scales": dtype, ".zero_points": ir.DataType.UINT8}
        parts = ("", ".scales") if symmetric else ("", ".scales", ".zero_points")
        shared = SharedResult(quantize, parts=len(parts))
        tensors = [op.initializer(lazy_tensor(lambda i=i: shared.take(i), types[part], shapes[part],
                                              name=f"{prefix}{part}", sources=[source]))
                   for i, part in enumerate(parts)]
        inputs = [a, *tensors]
        if bias is not None:  # MatMulNBits' inputs: A, B, scales, zero_points, g_idx, bias
            bias_tensor = ir.tensor(_as_dtype(bias, dtype), dtype=dtype, name=f"{prefix}.bias")
            inputs += [None] * (5 - len(inputs)) + [op.initializer(bias_tensor)]
        self.result.count += 1
        self.result.details["weight_bytes_before"] += int(K * N * source.dtype.itemsize)
        self.result.details["weight_bytes_after"] += sum(
            int(np.prod(shapes[part]) * types[part].itemsize) for part in parts)
        extra = {"accuracy_level": self.accuracy_level} if self.accuracy_level else {}
        out = op.MatMulNBits(*inputs, _domain=ORT_DOMAIN, K=K, N=N, bits=self.bits, block_size=self.block, **extra)
        out.type, out.shape = y.type, y.shape
        return out


def _as_dtype(array: np.ndarray, dtype: ir.DataType) -> np.ndarray:
    """``array`` in the activation dtype (MatMulNBits' scales and bias take A's)."""
    target = from_onnx(dtype.value) or "fp32"
    if target == "bf16":
        return array.astype(np.float32).astype(numpy_dtype(target))
    return array.astype(numpy_dtype(target))


def quantize_weights(
    model: ir.Model,
    scheme: str,
    block_size: int = 32,
    *,
    symmetric: bool = True,
    accuracy_level: int = 0,
    dtypes: tuple[ir.DataType, ...] = (ir.DataType.FLOAT,),
) -> PassResult:
    """Quantize every non-expert, non-router constant weight of a MatMul/Gemm (``scheme``: int8 | int4).

    ``block_size``: weights per scale along K, a power of two >= 16. ``symmetric``: no zero points
    (False: a uint8 zero point per block). ``accuracy_level``: MatMulNBits' attribute (4: int8
    activations allowed on the CPU; 0: activations in their dtype). ``dtypes``: the activation
    dtypes the target runs MatMulNBits in; other nodes are left alone, with the reason.
    """
    if scheme not in BITS:
        raise ValueError(f"scheme must be one of {', '.join(BITS)}, got {scheme!r}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16 (MatMulNBits' rule), got {block_size}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level must be one of 0, 1, 2, 3, 4 (MatMulNBits'), got {accuracy_level!r}")
    result = PassResult(f"quantize_weights_{scheme}", details={
        "block_size": block_size, "symmetric": symmetric, "accuracy_level": accuracy_level,
        "weight_bytes_before": 0, "weight_bytes_after": 0,
    })
    routers = router_nodes(model)
    args = (BITS[scheme], block_size, symmetric, accuracy_level, dtypes, routers, set(), result)
    rules = [_QuantizeLinear.rule("MatMul", False, *args), _QuantizeLinear.rule("Gemm", True, *args),
             _QuantizeLinear.rule("Gemm", False, *args)]
    pattern.RewriteRuleSet(rules).apply_to_model(model)
    remove_dead_code(model)
    return result
