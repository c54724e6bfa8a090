"""The targets and options of ``optimize``, importable without onnx or ONNX Runtime (the CLI
builds its parser from them on every ``moetrt`` command)."""

from __future__ import annotations

from dataclasses import dataclass

from moetrt.dtypes import DTYPES

__all__ = ["TargetSpec", "TARGETS", "ENGINE_TARGETS", "PRECISIONS", "QUANTIZE_EXPERTS", "QUANTIZE_WEIGHTS",
           "MOE_LOWERING", "EXPERT_ACTIVATIONS", "WEIGHT_ACTIVATIONS", "DEFAULT_BLOCK_SIZE",
           "DEFAULT_WEIGHT_BLOCK_SIZE", "resolve_precision"]

PRECISIONS = DTYPES
QUANTIZE_EXPERTS = ("int8", "int4")
MOE_LOWERING = ("auto", "always", "off")
QUANTIZE_WEIGHTS = ("int8", "int4")  # the non-expert weights, as com.microsoft::MatMulNBits
EXPERT_ACTIVATIONS = {"int8": 4, "fp32": 0}  # -> QMoE accuracy_level (MatMulNBits' meaning)
WEIGHT_ACTIVATIONS = {"int8": 4, "fp32": 0}  # -> MatMulNBits accuracy_level on ort-cpu
DEFAULT_BLOCK_SIZE = 32
# MatMulNBits blocks by weight scheme where they differ from the experts' (int4: DEFAULT_BLOCK_SIZE's). int8 weights
# in blocks of 128: tiny's held-out perplexity +0.007% (blocks of 32: -0.006%; with int4 experts +0.69% either way),
# and on bench-small (ONNX Runtime 1.32 CPU, 1 thread) decode of int4 experts + int8 weights 1.26x, the step's
# MatMulNBits kernels alone 1.4-1.5x (benchmarks/bench_quantized_cpu.py). int4 weights keep 32: +1.8% at 128 vs +0.33%.
DEFAULT_WEIGHT_BLOCK_SIZE = {"int8": 128}


@dataclass(frozen=True)
class TargetSpec:
    """What a target needs from ONNX Runtime and which activation dtypes its fused MoE ops take."""

    name: str
    provider: str  # the execution provider the folder is built for
    package: str  # the pip package that brings that provider
    min_ort: tuple[int, int, int]  # the release whose fused MoE op computes SwiGLU experts correctly
    why_min_ort: str
    moe_dtypes: tuple[str, ...]  # activation dtypes (onnx_ir.DataType names) of the fused MoE/QMoE ops
    moe_policy: str  # the default policy of lower_moe for this target
    nbits_dtypes: tuple[str, ...] = ("FLOAT",)  # activation dtypes its com.microsoft::MatMulNBits kernels take


TARGETS: dict[str, TargetSpec] = {
    "ort-cpu": TargetSpec(
        "ort-cpu", "CPUExecutionProvider", "onnxruntime", (1, 23, 1),
        "the CPU com.microsoft::MoE kernel with interleaved SwiGLU experts (swiglu_fusion=1)",
        ("FLOAT",),
        "auto",  # the fused op for decode steps, the function body for prefill (measured: lower_moe)
        ("FLOAT", "FLOAT16"),
    ),
    "ort-cuda": TargetSpec(
        "ort-cuda", "CUDAExecutionProvider", "onnxruntime-gpu", (1, 28, 0),
        "the CUDA com.microsoft::MoE kernel with a correct SwiGLU (activation_alpha/beta honoured)",
        ("FLOAT16", "BFLOAT16"),
        "always",  # one fused kernel at every T; an If on T would also sync the host each step
        ("FLOAT", "FLOAT16", "BFLOAT16"),
    ),
}
# built by optimize.trt.engine_from_onnx rather than by ONNX graph passes
ENGINE_TARGETS = ("trt", "trt-rtx")  # trt-rtx: TensorRT for RTX, built without a GPU


def resolve_precision(src_dir, export: dict, precision: str | None) -> str:
    """The precision to build in: ``precision``, or the export's; converting is from fp32 exports only."""
    from moetrt.errors import UnsupportedModelError

    source_dtype = export.get("dtype", "fp32")
    precision = precision or source_dtype
    if precision != source_dtype and source_dtype != "fp32":
        raise UnsupportedModelError(
            f"{src_dir} was exported in {source_dtype}; precision is converted from fp32 exports only: "
            f"re-export with `moetrt export --dtype fp32` (or keep --precision {source_dtype})"
        )
    return precision
