"""DeepSeek-V3 through ``optimize --target ort-cpu``: the passes leave multi-head latent attention computing
what the reference computes, and its state (``latent`` / ``rope_key`` per layer) named and shaped as exported.

The tiny ``deepseek_v3`` variant (tests/hf_tiny.py): 3 layers (the first dense), q and kv low-rank with
their own RMSNorms (``q_a_layernorm``, ``kv_a_layernorm``), YaRN RoPE with mscale, grouped sigmoid routing
with a selection bias (TopKRouting version 2), two shared experts.
"""

from __future__ import annotations

import json

import onnx_ir as ir
import pytest

from tests.optimize.helpers import compare, node_counts, session

pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

VARIANT = "deepseek_v3"
# (batch, new tokens, past): never the traced (2, 5, 3); a decode step alone and on a cache, a left-padded
# prefill, and a prefill on a cache
SHAPES = [(1, 1, 0), (2, 1, 7), (3, 17, 0), (2, 9, 20)]
# 3 layers x (input, post-attention, q_a, kv_a) + the final norm: the latent attention's norms fuse too
NORMS = 3 * 4 + 1
OPTIONS = [dict(), dict(last_logits=True), dict(precision="fp16"), dict(fuse_norms=True)]
IDS = ["default", "last_logits", "fp16", "fuse_norms"]


@pytest.fixture(scope="module")
def optimized(optimized_variant):
    """(options) -> (reference, exported folder, optimized folder) of VARIANT, cached."""
    return lambda **options: optimized_variant(VARIANT, **options)


@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_latent_state_survives_every_pass(optimized, options):
    model, folder, out = optimized(**options)
    state = model.state
    meta, exported = (json.loads((f / "moetrt.json").read_text()) for f in (out, folder))
    assert meta["io"]["state"] == exported["io"]["state"] == state.to_dict()
    graph = ir.load(out / "model.onnx")
    inputs = {v.name: v for v in graph.graph.inputs}
    outputs = {v.name: v for v in graph.graph.outputs}
    dtype = ir.DataType.FLOAT16 if options.get("precision") == "fp16" else ir.DataType.FLOAT
    for name in state.all_past_names():
        _, entry = state.entry_of(name)
        assert inputs[name].dtype == dtype and len(inputs[name].shape) == len(entry.dims) == 3, name
    for name in state.all_present_names():
        assert outputs[name].dtype == dtype, name
    counts = node_counts(graph)
    assert counts["moetrt::TopKRouting"] == len(model.config.moe_layers)  # version 2: kept as the canonical node
    if options.get("fuse_norms"):
        assert counts["SimplifiedLayerNormalization"] + counts["com.microsoft::SkipSimplifiedLayerNormalization"] == NORMS


# (options, shape): with last_logits the graph returns one position, so it is compared on decode steps (S = 1),
# where that position is all the reference computes
CASES = [(options, shape) for options in OPTIONS for shape in SHAPES if not options.get("last_logits") or shape[1] == 1]


@pytest.mark.parametrize("options,shape", CASES,
                         ids=[f"{IDS[OPTIONS.index(o)]}-b{b}s{s}p{p}" for o, (b, s, p) in CASES])
def test_optimized_latent_attention_matches_the_reference(optimized, options, shape):
    model, _, out = optimized(**options)
    batch, seq, past = shape
    dtype = options.get("precision", "fp32")
    logits, kv, got = compare(model, session(out / "model.onnx"), batch, seq, past, dtype=dtype, seed=batch * 10 + seq)
    assert got["logits"].shape[:2] == (batch, seq)
    assert logits.ok, f"logits: {logits}"
    assert kv.ok, f"latent state: {kv}"
