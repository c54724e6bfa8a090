"""``moetrt optimize DIR --target ort-cpu|ort-cuda -o OUT``: the subcommand's arguments and its run.

The CLI registers it with ``command("optimize", HELP, add_arguments)(run)``; ``run`` calls
:func:`moetrt.optimize.optimize`, as a Python user would, and prints where the folder went.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "run", "HELP"]

HELP = "optimize an exported folder for ONNX Runtime (lowered MoE ops, fp16/bf16, int8/int4 experts and weights)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .targets import (
        DEFAULT_BLOCK_SIZE, ENGINE_TARGETS, EXPERT_ACTIVATIONS, MOE_LOWERING, PRECISIONS, QUANTIZE_EXPERTS,
        QUANTIZE_WEIGHTS, TARGETS, WEIGHT_ACTIVATIONS,
    )

    p.add_argument("source", metavar="DIR", help="a folder written by `moetrt export` (the canonical ONNX)")
    p.add_argument("--target", "-t", required=True, choices=(*TARGETS, *ENGINE_TARGETS),
                   help="ort-cpu: ONNX Runtime CPU; ort-cuda: ONNX Runtime CUDA; trt: a TensorRT engine folder; "
                        "trt-rtx: a TensorRT for RTX engine folder, built without a GPU")
    p.add_argument("--output", "-o", required=True, metavar="OUT", help="the optimized folder to write")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="activations and weights; fp16/bf16 convert an fp32 export, keeping router, softmax "
                        "and logits fp32 (default: the export's dtype)")
    p.add_argument("--quantize-experts", choices=QUANTIZE_EXPERTS, default=None,
                   help="weight-only block-wise quantization of the routed experts (com.microsoft::QMoE)")
    p.add_argument("--quantize-weights", choices=QUANTIZE_WEIGHTS, default=None,
                   help="weight-only block-wise quantization of the other linear layers: attention, dense MLPs, "
                        "shared experts, lm_head (com.microsoft::MatMulNBits; the router stays fp32)")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, metavar="N",
                   help="weights per quantization scale, a power of two >= 16, for the experts and int4 weights "
                        "(default: %(default)s)")
    p.add_argument("--weight-block-size", type=int, default=None, metavar="N",
                   help="--quantize-weights: weights per scale of the MatMulNBits weights, a power of two >= 16 "
                        "(default: 128 for int8, --block-size for int4)")
    p.add_argument("--expert-activations", choices=tuple(EXPERT_ACTIVATIONS), default="int8",
                   help="ort-cpu, quantized experts: int8 activations inside the expert GEMMs (faster decode; "
                        "int8 experts always use them) or fp32 (default: %(default)s)")
    p.add_argument("--weight-activations", choices=tuple(WEIGHT_ACTIVATIONS), default="int8",
                   help="ort-cpu, --quantize-weights: int8 activations inside MatMulNBits (accuracy_level 4, the "
                        "fast CPU kernels) or fp32 (int4 only) (default: %(default)s)")
    p.add_argument("--weight-zero-points", action="store_true",
                   help="--quantize-weights with a zero point per block (asymmetric) instead of symmetric blocks")
    p.add_argument("--fuse-norms", action="store_true",
                   help="RMSNorms (with the residual add before them) as ONNX Runtime's SimplifiedLayerNormalization "
                        "and SkipSimplifiedLayerNormalization kernels")
    p.add_argument("--group-attention", action=argparse.BooleanOptionalAction, default=None,
                   help="attention on the cached key/value heads themselves, the queries grouped by head, instead "
                        "of on the heads repeated per query head (no copy of the cache per step; default: on for "
                        "ort-cpu, off for ort-cuda)")
    p.add_argument("--last-logits", action="store_true",
                   help="logits of the last position only ([B, 1, V], transformers' logits_to_keep=1): the final norm "
                        "and lm_head skip the other prompt positions in a prefill (for generation, not for scoring "
                        "every position)")
    p.add_argument("--moe-lowering", choices=MOE_LOWERING, default=None,
                   help="auto: com.microsoft::MoE for decode steps, the function body for prefill; always; off "
                        "(default: auto on ort-cpu, always on ort-cuda)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is a moetrt folder")
    p.add_argument("--no-check-runtime", action="store_true",
                   help="do not require the target's ONNX Runtime on this machine (build for another one)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    t = p.add_argument_group("TensorRT (--target trt: needs tensorrt >= 10.9 and a GPU; --target trt-rtx: needs "
                             "tensorrt-rtx-cu12, no GPU)")
    t.add_argument("--profile", default=None, metavar="RANGES",
                   help="optimization profile(s), e.g. batch=1:4:8,seq=1:512:4096,past=0:1024:4096 "
                        "(min:opt:max per axis; ';' separates profiles; default: that one, cut to the model)")
    t.add_argument("--timing-cache", default=None, metavar="FILE",
                   help="TensorRT timing cache to reuse and update (default: one per GPU and TensorRT version "
                        "under ~/.cache/moetrt)")
    t.add_argument("--no-timing-cache", action="store_true", help="build without a timing cache")
    t.add_argument("--plugins", choices=("aot", "jit", "none"), default=None,
                   help="aot: engines run without Python (Triton PTX embedded); jit: Python plugins; none: the ops' "
                        "function bodies, standard TensorRT layers (default: aot for trt; trt-rtx takes none only)")
    t.add_argument("--compute-capability", action="append", default=None, metavar="X.Y", dest="compute_capabilities",
                   help="trt-rtx: a GPU compute capability to build for, e.g. 8.6 (repeat for several; default: "
                        "every one TensorRT for RTX targets from 8.0 on)")


def run(args: argparse.Namespace) -> int:
    """Optimize an exported folder for one ONNX Runtime target.

    The output keeps the export's inputs and outputs (the runtime runs it unchanged; with
    --last-logits, logits hold the last position only) and lists
    the passes applied, with their counts, in its moetrt.json.

    examples:
      moetrt optimize exported/tiny --target ort-cpu -o optimized/tiny
      moetrt optimize exported/tiny -t ort-cpu -o optimized/tiny-int4 --quantize-experts int4
      moetrt optimize exported/tiny -t ort-cpu -o optimized/tiny-q --quantize-experts int4 --quantize-weights int8
      moetrt optimize exported/tiny -t ort-cpu -o optimized/tiny-last --last-logits
      moetrt optimize exported/model -t ort-cuda -o optimized/model-fp16 --precision fp16
      moetrt optimize exported/model -t trt -o engines/model --precision fp16 --profile batch=1:1:4,seq=1:256:2048
      moetrt optimize exported/model -t trt-rtx -o engines/model-rtx --compute-capability 8.6 --compute-capability 12.0
    """
    from .lower import optimize

    if args.target in ("trt", "trt-rtx"):
        timing_cache = False if args.no_timing_cache else args.timing_cache
        rtx = {"compute_capabilities": args.compute_capabilities} if args.compute_capabilities else {}
        out = optimize(args.source, args.output, args.target, precision=args.precision,
                       quantize_experts=args.quantize_experts, quantize_weights=args.quantize_weights,
                       fuse_norms=args.fuse_norms, group_attention=args.group_attention, last_logits=args.last_logits,
                       overwrite=args.overwrite,
                       progress=not args.quiet, profile=args.profile, timing_cache=timing_cache, plugins=args.plugins,
                       **rtx)
    else:
        out = optimize(
            args.source, args.output, args.target, precision=args.precision, quantize_experts=args.quantize_experts,
            quantize_weights=args.quantize_weights, block_size=args.block_size,
            weight_block_size=args.weight_block_size, expert_activations=args.expert_activations,
            weight_activations=args.weight_activations,
            weight_zero_points=args.weight_zero_points, fuse_norms=args.fuse_norms,
            group_attention=args.group_attention, last_logits=args.last_logits,
            moe_lowering=args.moe_lowering,
            overwrite=args.overwrite, check_runtime=not args.no_check_runtime, progress=not args.quiet,
        )
    print(out)
    sys.stdout.flush()
    return 0
