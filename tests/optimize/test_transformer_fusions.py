"""fuse_norms: RMSNorm -> SimplifiedLayerNormalization, residual add + RMSNorm -> SkipSimplifiedLayerNormalization.

Structure and numbers together: the norms are fused ops, the moetrt functions are untouched,
and the outputs equal the canonical graph's (the same fp32 math, other kernels).
"""

from __future__ import annotations

import json

import onnx_ir as ir
import pytest

from moetrt.optimize import optimize
from moetrt.optimize.transformer_fusions import fuse_norms
from tests.optimize.helpers import apply_pass, compare, node_counts, session

pytest.importorskip("onnxruntime")

SHAPES = [(1, 1, 0), (2, 9, 20), (1, 64, 0)]
# (variant, norms of the canonical graph, of which after a residual add): tiny 4 layers x 2 + the final
# norm, all but layer 0's first after an add; qwen3_moe (3 layers) adds a per-head q and k norm per layer
NORMS = {"tiny": (9, 8), "qwen3_moe": (13, 6)}


@pytest.mark.parametrize("variant", list(NORMS))
def test_norms_fused_and_outputs_equal(canonical, tmp_path, record_max, variant):
    model, folder = canonical(variant)
    before = node_counts(ir.load(folder / "model.onnx"))
    result, graph = apply_pass(folder, tmp_path / "model.onnx", fuse_norms)
    counts = node_counts(graph)
    norms, skips = NORMS[variant]
    assert result.count == norms and result.details["SkipSimplifiedLayerNormalization"] == skips
    assert counts["com.microsoft::SkipSimplifiedLayerNormalization"] == skips
    assert counts["SimplifiedLayerNormalization"] == norms - skips
    assert counts["Pow"] == 0 and counts["ReduceMean"] == 0 and counts["Reciprocal"] == 0
    for op in ("moetrt::TopKRouting", "moetrt::SparseMoE"):
        assert counts[op] == before[op] > 0
    assert {f.name for f in graph.functions.values()} == {"TopKRouting", "SparseMoE"}
    sess = session(tmp_path / "model.onnx")
    for batch, seq, past in SHAPES:
        logits, kv, _ = compare(model, sess, batch, seq, past, seed=seq)
        record_max("fuse_norms max abs error vs reference (logits)", variant, logits.max_abs)
        assert logits.ok, f"{variant} {batch}x{seq}+{past}: {logits}"
        assert kv.ok, f"{variant} {batch}x{seq}+{past}: {kv}"


def test_optimize_option(canonical, tmp_path):
    model, src = canonical("tiny")
    out = optimize(src, tmp_path / "o", fuse_norms=True, quantize_experts="int4", quantize_weights="int8",
                   progress=False)
    meta = json.loads((out / "moetrt.json").read_text())["optimize"]
    assert meta["fuse_norms"] is True
    assert [p["name"] for p in meta["passes"]] == ["fuse_norms", "group_attention", "quantize_weights_int8",
                                                   "quantize_experts_int4", "lower_moe"]
    counts = node_counts(ir.load(out / "model.onnx"))
    assert counts["com.microsoft::SkipSimplifiedLayerNormalization"] == 8
    assert counts["com.microsoft::MatMulNBits"] == 17 and counts["com.microsoft::QMoE"] == 4
    from moetrt.runtime import Session

    assert len(Session(out, backend="ort").generate([[5, 6, 7]], max_new_tokens=3, stop_tokens=()).tokens[0]) == 3


def test_trt_refuses(canonical, tmp_path):
    from moetrt.errors import MoetrtError

    _, src = canonical("tiny")
    with pytest.raises(MoetrtError, match="--fuse-norms applies to the ONNX Runtime targets"):
        optimize(src, tmp_path / "x", "trt", fuse_norms=True, progress=False)
