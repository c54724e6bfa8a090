"""Pass: RMSNorm -> ``SimplifiedLayerNormalization``, residual add + RMSNorm -> ``com.microsoft::SkipSimplifiedLayerNormalization``.

The exported RMSNorm is six ops (``Pow``, ``ReduceMean``, ``Add`` of epsilon, ``Sqrt``,
``Reciprocal``, two ``Mul``) and ONNX Runtime's own session-level graph optimizations do not
fuse them on these graphs (its C++ fusion matches only ``Div``-based norms). onnxscript's
rewrite rules for ONNX Runtime (the ones transformers' ONNX exporter runs with
``ort_fusions="cpu"``) do, without touching the ``moetrt`` functions:

- ``SimplifiedLayerNormalization(x, weight)`` (ONNX Runtime's RMSNorm kernel, in the ONNX domain)
  for every norm, statistics in float32 as the reference computes them;
- ``com.microsoft::SkipSimplifiedLayerNormalization(x, residual, weight)`` where the norm's input
  is a residual ``Add``: one kernel adds, normalizes and returns the sum for the next residual.

The rest of onnxscript's transformer fusions do not apply to these graphs: its rotary fusion
needs the cos/sin-cache pattern of Hugging Face's exports (ours computes the angles from
``position_ids`` in the graph), and its SDPA / GroupQueryAttention fusions do not match the
exported attention (explicit additive mask, KV heads repeated before the score MatMul); see
benchmarks/results/ort_optimize.md.
"""

from __future__ import annotations

import onnx_ir as ir

from ._common import PassResult, remove_dead_code

__all__ = ["fuse_norms"]


def fuse_norms(model: ir.Model) -> PassResult:
    """Fuse every RMSNorm (and residual add before it) into ONNX Runtime's kernels; returns the counts."""
    from onnx_ir.passes import common as common_passes
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
    from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

    common_passes.ShapeInferencePass()(model)  # the rules check the dtypes of the norm's input and weight
    norms = fuse_rms_normalization(model)
    skips = fuse_skip_rms_normalization(model)
    remove_dead_code(model)
    return PassResult("fuse_norms", count=norms, details={"SimplifiedLayerNormalization": norms - skips,
                                                          "SkipSimplifiedLayerNormalization": skips})
