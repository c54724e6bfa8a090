"""group_attention: attention on the cached key/value heads, the queries grouped by head, instead of on
the heads repeated per query head. The repeats are gone and the outputs equal the reference's, with a
mask, q/k norms (qwen3_moe) and attention sinks with a sliding window (gpt_oss) between the MatMuls."""

from __future__ import annotations

import json

import onnx_ir as ir
import pytest

from moetrt.optimize import optimize
from moetrt.optimize.grouped_attention import group_attention
from tests.optimize.helpers import apply_pass, compare, node_counts, session

pytest.importorskip("onnxruntime")

SHAPES = [(1, 1, 0), (2, 9, 20), (1, 1, 37)]  # a prompt token, a padded batch on a cache, one decode step


@pytest.mark.parametrize("variant", ["tiny", "qwen3_moe", "gpt_oss"])
def test_no_repeats_and_outputs_equal(canonical, tmp_path, record_max, variant):
    model, folder = canonical(variant)
    before = node_counts(ir.load(folder / "model.onnx"))
    result, graph = apply_pass(folder, tmp_path / "model.onnx", group_attention)
    layers = model.config.num_hidden_layers
    assert result.count == 2 * layers, result  # each layer's keys and values
    counts = node_counts(graph)
    assert counts["Expand"] == before["Expand"] - 2 * layers
    sess = session(tmp_path / "model.onnx")
    for batch, seq, past in SHAPES:
        logits, kv, _ = compare(model, sess, batch, seq, past, seed=seq + past)
        record_max("group_attention max abs error vs reference (logits)", variant, logits.max_abs)
        assert logits.ok, f"{variant} {batch}x{seq}+{past}: {logits}"
        assert kv.ok, f"{variant} {batch}x{seq}+{past}: {kv}"


def test_optimize_option(canonical, tmp_path):
    _, src = canonical("tiny")
    out = optimize(src, tmp_path / "o", group_attention=True, quantize_experts="int4", quantize_weights="int8",
                   progress=False)
    meta = json.loads((out / "moetrt.json").read_text())["optimize"]
    assert meta["group_attention"] is True
    assert [p["name"] for p in meta["passes"]][:2] == ["group_attention", "quantize_weights_int8"]
    from moetrt.runtime import Session

    assert len(Session(out, backend="ort").generate([[5, 6, 7]], max_new_tokens=3, stop_tokens=()).tokens[0]) == 3


def test_trt_refuses(canonical, tmp_path):
    from moetrt.errors import MoetrtError

    _, src = canonical("tiny")
    with pytest.raises(MoetrtError, match="--group-attention applies to the ONNX Runtime targets"):
        optimize(src, tmp_path / "x", "trt", group_attention=True, progress=False)
