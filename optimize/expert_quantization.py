"""Pass: weight-only block-wise int8/int4 experts, ``moetrt`` pair -> ``com.microsoft::QMoE``.

Each MoE layer ONNX Runtime's fused op computes exactly (the routing values
:data:`ROUTER_IMPLEMENTS` or :func:`log_weights_implements` declare and the expert values
:func:`experts_implements` declares: ``silu`` or gpt-oss's ``clamped_swiglu``, with or without
expert biases; every other value is refused, see
:func:`moetrt.optimize.moe_lowering.lowering_blocker`) becomes one ``QMoE`` node that runs the
experts from quantized weights: it routes on the router logits where its softmax routing is
TopKRouting's (softmax, ``scale == 1``, no selection bias, no groups), and otherwise mixes the kept
TopKRouting node's weights (the log-weights path, moe_lowering's docstring: ``router_probs`` the
log-scores that choose, ``router_weights`` the weights scattered to [T, E] that mix, with
``normalize_routing_weights=0``; DeepSeek-V3, GLM-4.5, MiniMax-M2). Every other op keeps its
precision; the expert biases stay in the activation dtype (``fc1_experts_bias`` interleaved like
fc1, ``fc2_experts_bias`` as it is).

Layout (``com.microsoft::QMoE`` version 1, ``quant_type="int"``, ``weights_prepacked=0``: the raw
layout every execution provider accepts and repacks at load time):

    fc1_experts_weights  uint8 [E, 2F, D * bits / 8]   gate/up rows interleaved (swiglu_fusion=1)
    fc1_scales           [E, 2F, D / block]           in the activation dtype
    fc2_experts_weights  uint8 [E, D, F * bits / 8]
    fc2_scales           [E, D, F / block]

Quantization is symmetric per block of ``block`` consecutive input features (the K axis) of
one output row: ``scale = max|w| / qmax`` (qmax 127 for int8, 7 for int4), ``q = clip(round(w /
scale), -qmax - 1, qmax)``, stored as ``q + 2**(bits - 1)`` (no zero-point tensor: QMoE's default
zero point is ``2**(bits - 1)``), and int4 packs two values per byte, the even K index in the low
nibble (MatMulNBits' order). So every weight is off by at most ``scale / 2 = max|w_block| / (2 *
qmax)``: 0.4% of the block's largest weight for int8, 7% for int4.

``block`` must be a power of two >= 16 dividing both D and F (QMoE's rule); the default 32
falls back to 16 where 32 does not divide them, and a layer neither divides is left as it was.

Non-normalised routing (Qwen2-MoE, OLMoE, Grok) feeds ``router_weights = softmax(logits)``:
QMoE renormalises its top-k weights even with ``normalize_routing_weights=0``, and takes the
mixing weights from that input when it is given (the router logits still select the experts).

Activations: ONNX Runtime's CPU kernel runs int8 blocks with activations rounded to int8 per
block (it has no fp32-activation int8 kernel; the ``ORT_QMOE_CPU_QNBIT_GEMM=fp32`` environment
variable selects a slower dequantizing path), and int4 blocks with float32 activations unless
``accuracy_level=4`` (MatMulNBits' meaning) allows int8 ones. On bench-small int8 activations
decode int4 experts 1.5x faster (44 -> 66 tok/s) at no measurable cost on tiny's held-out
perplexity (+0.11% against fp32 either way), so ``optimize`` asks for them on ort-cpu
(``expert_activations="int8"``); ``accuracy_level=None`` leaves ORT's default (fp32 for int4).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from moetrt.ops._onnx import DOMAIN

from ._common import ORT_DOMAIN, MoELayer, PassResult, SharedResult, lazy_tensor, read_moe_layer, remove_dead_code
from .moe_lowering import (
    cast_like,
    chosen_weights, expert_bias_inputs, experts_implements, interleave_gate_up, interleaved_gate_up_bias,
    log_weight_scores, lowering_blocker, moe_attributes, routing_of,
)
from .targets import DEFAULT_BLOCK_SIZE

__all__ = [
    "quantize_experts", "quantize_blockwise", "dequantize_blockwise", "BITS", "DEFAULT_BLOCK_SIZE", "pick_block_size",
]

BITS = {"int8": 8, "int4": 4}
# QMoE takes MoE's routing and SwiGLU attributes, so it implements the same TopKRouting and SparseMoE
# values (ROUTER_IMPLEMENTS or log_weights_implements, experts_implements); its routing renormalises the
# top k even with normalize_routing_weights=0, which the rewrite below makes up for with router_weights.
_WHAT = "com.microsoft::QMoE"
_NUMPY_DTYPES = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}


def quantize_blockwise(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """w [E, N, K] float -> (packed uint8 [E, N, K * bits / 8], scales float32 [E, N, K / block])."""
    experts, rows, cols = w.shape
    assert cols % block == 0 and bits in (4, 8), (w.shape, bits, block)
    qmax = 2 ** (bits - 1) - 1
    blocks = w.astype(np.float32).reshape(experts, rows, cols // block, block)  # [E, N, K/b, b]
    scales = np.abs(blocks).max(axis=-1) / qmax  # [E, N, K/b]
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)  # an all-zero block: any scale
    q = np.clip(np.rint(blocks / scales[..., None]), -qmax - 1, qmax).astype(np.int16) + 2 ** (bits - 1)
    q = q.astype(np.uint8).reshape(experts, rows, cols)  # [E, N, K] in 0 .. 2**bits - 1
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)  # [E, N, K/2], even K in the low nibble
    return np.ascontiguousarray(q), scales


def dequantize_blockwise(q: np.ndarray, scales: np.ndarray, bits: int, block: int) -> np.ndarray:
    """The inverse of :func:`quantize_blockwise`: float32 [E, N, K]."""
    if bits == 4:
        q = np.stack([q & 0x0F, q >> 4], axis=-1).reshape(*q.shape[:-1], q.shape[-1] * 2)  # [E, N, K]
    experts, rows, cols = q.shape
    centred = q.astype(np.float32) - 2 ** (bits - 1)
    return (centred.reshape(experts, rows, cols // block, block) * scales[..., None]).reshape(experts, rows, cols)


def pick_block_size(dim: int, ffn: int, requested: int) -> int | None:
    """The largest power of two in 16..requested dividing both D and F (QMoE's rule), or None."""
    block = requested
    while block >= 16:
        if dim % block == 0 and ffn % block == 0:
            return block
        block //= 2
    return None


def _quantizer(tensor: ir.TensorProtocol, interleave: bool, bits: int, block: int, scales_dtype: ir.DataType):
    """() -> (packed weight, scales in ``scales_dtype``) of ``tensor``, gate/up interleaved first if asked."""

    if scales_dtype == ir.DataType.BFLOAT16:
        import ml_dtypes  # a dependency of onnx-ir

        scales_np = ml_dtypes.bfloat16
    else:
        scales_np = _NUMPY_DTYPES.get(scales_dtype, np.float32)

    def compute() -> tuple[np.ndarray, np.ndarray]:
        weight = tensor.numpy()  # [E, N, K], memory-mapped when the model's weights are external
        experts, rows, cols = weight.shape
        q = np.empty((experts, rows, cols * bits // 8), np.uint8)
        scales = np.empty((experts, rows, cols // block), scales_np)
        for e in range(experts):  # expert by expert: the float32 temporaries stay one expert's size
            one = weight[e : e + 1]
            q[e : e + 1], s = quantize_blockwise(interleave_gate_up(one) if interleave else one, bits, block)
            scales[e : e + 1] = s.astype(scales_np)
        return q, scales

    return compute


class _QuantizeToQMoE(pattern.RewriteRuleClassBase):
    def __init__(self, bits: int, block_size: int, dtypes: tuple[ir.DataType, ...], accuracy_level: int | None,
                 result: PassResult):
        super().__init__(name="QuantizeToQMoE")
        self.bits, self.block_size, self.dtypes, self.result = bits, block_size, dtypes, result
        self.extra = {} if accuracy_level is None else {"accuracy_level": accuracy_level}

    def pattern(self, op, x, weights, indices, w_gate_up, w_down):
        # the optional biases (inputs 5, 6) are read by read_moe_layer, which refuses what it cannot read
        return op.SparseMoE(x, weights, indices, w_gate_up, w_down, _domain=DOMAIN, _allow_other_attributes=True,
                            _allow_other_inputs=True, _outputs=["y"])

    def check(self, context, y, **_):
        check = pattern.MatchResult()
        node = y.producer()
        layer = read_moe_layer(node)
        reason = lowering_blocker(layer, self.dtypes, _WHAT, experts=experts_implements)
        if reason is None and pick_block_size(layer.hidden_size, layer.ffn_size, self.block_size) is None:
            reason = (f"D={layer.hidden_size} and F={layer.ffn_size} share no power-of-two block of 16.."
                      f"{self.block_size} (QMoE needs one dividing both)")
        if reason is not None:
            self.result.skipped[node.name or "SparseMoE"] = reason
            return check.fail(reason)
        return check

    def rewrite(self, op, x, w_gate_up, w_down, y, **_):
        layer = read_moe_layer(y.producer())
        assert isinstance(layer, MoELayer)
        block = pick_block_size(layer.hidden_size, layer.ffn_size, self.block_size)
        scales_dtype = x.dtype if x.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16) else ir.DataType.FLOAT
        tensors = []
        for tensor, interleave, source in ((layer.w_gate_up_tensor, True, w_gate_up),
                                           (layer.w_down_tensor, False, w_down)):
            # quantized when saved, one weight at a time: the packed weight and its scales share one computation
            shared = SharedResult(_quantizer(tensor, interleave, self.bits, block, scales_dtype), parts=2)
            experts, rows, cols = tensor.shape
            name = f"{source.name}.q{self.bits}"
            q = lazy_tensor(lambda s=shared: s.take(0), ir.DataType.UINT8, (experts, rows, cols * self.bits // 8),
                            name=name, sources=[tensor])
            scales = lazy_tensor(lambda s=shared: s.take(1), scales_dtype, (experts, rows, cols // block),
                                 name=f"{name}.scales", sources=[tensor])
            tensors += [op.initializer(q), op.initializer(scales)]
        fc1, fc1_scales, fc2, fc2_scales = tensors
        b_gate_up, b_down = expert_bias_inputs(y.producer())
        fc1_bias = interleaved_gate_up_bias(op, layer, b_gate_up)  # [E, 2F] interleaved like fc1, or None
        logits = cast_like(op, layer.logits, x)  # [T, E]
        mixing = []
        attributes = moe_attributes(layer)
        if routing_of(layer, _WHAT)[0] == "log_weights":
            # the kept TopKRouting routes: the log-scores choose its experts, its weights mix as they are
            logits = cast_like(op, log_weight_scores(op, layer), x)  # [T, E]
            mixing = [None] * 6 + [cast_like(op, chosen_weights(op, layer), x)]  # [T, E]
            attributes = moe_attributes(layer, normalize=0)
        elif not layer.normalize:
            # QMoE renormalises the top-k weights even with normalize_routing_weights=0 (measured on
            # ORT 1.32 CPU); its router_weights input carries the full-softmax weights to mix with.
            probs = op.Softmax(layer.logits, axis=-1)  # [T, E] float32
            probs.type, probs.shape = layer.logits.type, layer.logits.shape
            mixing = [None] * 6 + [cast_like(op, probs, x)]
        inputs = [x, logits, fc1, fc1_scales, fc1_bias, fc2, fc2_scales, b_down, *mixing]
        while inputs[-1] is None:  # a layer without biases keeps the inputs it always had
            inputs.pop()
        self.result.count += 1
        self.result.details.setdefault("block_size", {})[layer.name] = block
        return op.QMoE(
            *inputs, _domain=ORT_DOMAIN,
            expert_weight_bits=self.bits, block_size=block, quant_type="int", weights_prepacked=0,
            **attributes, **self.extra,
        )


def quantize_experts(
    model: ir.Model,
    scheme: str,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dtypes: tuple[ir.DataType, ...] = (ir.DataType.FLOAT,),
    accuracy_level: int | None = None,
) -> PassResult:
    """Quantize the routed experts of every MoE layer QMoE computes exactly (``scheme``: int8 | int4).

    ``accuracy_level``: QMoE's attribute (4: int8 activations allowed on CPU; None: ORT's default).
    """
    if scheme not in BITS:
        raise ValueError(f"scheme must be one of {', '.join(BITS)}, got {scheme!r}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16 (QMoE's rule), got {block_size}")
    result = PassResult(f"quantize_experts_{scheme}", details={"accuracy_level": accuracy_level})
    _QuantizeToQMoE.rule(BITS[scheme], block_size, dtypes, accuracy_level, result).apply_to_model(model)
    remove_dead_code(model)
    return result
