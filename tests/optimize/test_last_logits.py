"""last_logits: the hidden states sliced to the last position before the final norm and the lm_head.

Structure and numbers together: ``logits`` becomes [B, 1, V], one Slice is inserted and the lm_head
sees one position, and the logits equal the un-sliced graph's last position (``present.*``
unchanged) within the fp32 table. Then what reads such a folder: optimize's metadata, the
composition with quantized weights (MatMulNBits lm_head), the generate loop on a left-padded batch
and parity against the reference's last position.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import moetrt
from moetrt.errors import MoetrtError, UnsupportedModelError
from moetrt.optimize import cli as optimize_cli
from moetrt.optimize import optimize
from moetrt.optimize.last_logits import last_logits
from moetrt.parity import check_close, tolerance
from tests.optimize.helpers import KV_NUMPY, apply_pass, batch_inputs, feeds, node_counts, session

pytest.importorskip("onnxruntime")

# a small random model unlike tiny: tied embeddings (the lm_head reads a transposed copy), a dense
# first layer, a shared expert
RANDOM = moetrt.MoEConfig(
    vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    num_experts=4, num_experts_per_tok=2, intermediate_size=32, shared_expert_intermediate_size=48,
    tie_word_embeddings=True, mlp_only_layers=(0,), dense_intermediate_size=80,
)
MODELS = {"tiny": "tiny", "random": RANDOM}
# (batch, new tokens, past): a prefill with left padding, a decode step, a continuation on a cache
SHAPES = [(2, 9, 0), (1, 1, 12), (2, 5, 7)]


def _lm_head(model: ir.Model) -> ir.Node:
    node = next(v for v in model.graph.outputs if v.name == "logits").producer()
    while node.op_type in ("Cast", "Identity"):
        node = node.inputs[0].producer()
    return node


def _run(sess, model, batch, seq, past, seed):
    """Outputs of ``sess`` on a left-padded batch whose past comes from the reference."""
    import torch

    ids, mask, positions = batch_inputs(model, batch, seq, past, seed)
    with torch.no_grad():
        cache = model(ids[:, :past], mask[:, :past], positions[:, :past]).past_key_values if past else None
    names = [o.name for o in sess.get_outputs()]
    out = sess.run(None, feeds(model, ids[:, past:], mask, positions[:, past:], cache, KV_NUMPY["fp32"]))
    return dict(zip(names, out))


@pytest.mark.parametrize("variant", list(MODELS))
def test_one_position_reaches_the_lm_head_and_logits_equal_the_last_row(canonical, tmp_path, record_max, variant):
    model, folder = canonical(MODELS[variant])
    before = node_counts(ir.load(folder / "model.onnx"))
    result, graph = apply_pass(folder, tmp_path / "model.onnx", last_logits)
    counts = node_counts(graph)
    vocab = model.config.vocab_size

    # structure: one Slice more, nothing else changed; logits [B, 1, V]; the lm_head reads [B, 1, D]
    assert result.count == 1
    assert counts - before == {"Slice": 1} and before - counts == {}
    logits = next(v for v in graph.graph.outputs if v.name == "logits")
    assert list(logits.shape.dims)[1:] == [1, vocab] and str(logits.shape.dims[0]) == "batch_size"
    head = _lm_head(graph)
    assert head.op_type == "MatMul" and head.inputs[0].shape.dims[1] == 1
    cut = next(n for n in graph.graph if n.name == "last_logits.slice")
    assert cut.inputs[0].name == result.details["hidden"] and cut.outputs[0].shape.dims[1] == 1
    unchanged = ir.load(folder / "model.onnx").graph.outputs[1:]
    assert all(v.shape == o.shape for v, o in zip(graph.graph.outputs[1:], unchanged))

    # numbers: the last position of the un-sliced graph, every present unchanged
    full, last = session(folder / "model.onnx"), session(tmp_path / "model.onnx")
    for batch, seq, past in SHAPES:
        want, got = _run(full, model, batch, seq, past, seq), _run(last, model, batch, seq, past, seq)
        assert got["logits"].shape == (batch, 1, vocab)
        close = check_close(got["logits"], want["logits"][:, -1:], tolerance("fp32", "logits"))
        record_max("last_logits max abs error vs the full graph's last position", variant, close.max_abs)
        assert close.ok, f"{variant} {batch}x{seq}+{past}: {close}"
        for name in want:
            if name != "logits":
                np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_composes_with_quantized_weights_and_experts(canonical, tmp_path):
    model, src = canonical("tiny")
    options = dict(quantize_weights="int8", quantize_experts="int4", progress=False)
    out = optimize(src, tmp_path / "last", last_logits=True, **options)
    full = optimize(src, tmp_path / "full", **options)
    meta = json.loads((out / "moetrt.json").read_text())
    opt = meta["optimize"]
    assert opt["last_logits"] is True
    assert json.loads((full / "moetrt.json").read_text())["optimize"]["last_logits"] is False
    assert [p["name"] for p in opt["passes"]] == ["last_logits", "group_attention", "quantize_weights_int8",
                                                  "quantize_experts_int4", "lower_moe"]
    assert opt["passes"][0]["count"] == 1
    logits_io = next(o for o in meta["io"]["outputs"] if o["name"] == "logits")
    assert logits_io["shape"] == ["batch_size", 1, model.config.vocab_size]
    graph = ir.load(out / "model.onnx")
    counts = node_counts(graph)
    assert counts["com.microsoft::MatMulNBits"] == 17 and counts["com.microsoft::QMoE"] == 4  # as without the pass
    head = _lm_head(graph)
    assert head.op_type == "MatMulNBits" and head.inputs[0].shape.dims[1] == 1  # the quantized lm_head, one position
    for batch, seq, past in SHAPES[:2]:
        want = _run(session(full / "model.onnx"), model, batch, seq, past, seq)
        got = _run(session(out / "model.onnx"), model, batch, seq, past, seq)
        close = check_close(got["logits"], want["logits"][:, -1:], tolerance("fp32", "logits"))
        assert close.ok, f"{batch}x{seq}+{past}: {close}"


def test_generate_gives_the_same_tokens_on_a_left_padded_batch(canonical, tmp_path):
    from moetrt.runtime import Session

    _, src = canonical("tiny")
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [42]]
    runs = {}
    for flag in (False, True):
        folder = optimize(src, tmp_path / f"last-{flag}", last_logits=flag, progress=False)
        runs[flag] = Session(folder, backend="ort").generate(prompts, max_new_tokens=6, stop_tokens=())
    assert runs[True].tokens == runs[False].tokens
    assert [len(t) for t in runs[True].tokens] == [6, 6, 6]


def test_parity_compares_the_last_position(canonical, tmp_path):
    from moetrt.parity import compare
    from moetrt.parity.compare import default_inputs, resolve_artifact
    from moetrt.parity.runners import TorchRunner

    pytest.importorskip("polygraphy")
    model, src = canonical("tiny")
    folder = optimize(src, tmp_path / "last", last_logits=True, progress=False)
    assert resolve_artifact(folder).last_logits and not resolve_artifact(src).last_logits
    feed = default_inputs(model, batch=2, seq=6, new_tokens=0)[0]
    assert TorchRunner(model, last_logits=True).infer_impl(feed)["logits"].shape == (2, 1, model.config.vocab_size)
    report = compare(model, folder, batch=2, seq=8, new_tokens=3, steps=4)
    result = report.backends["ort"]
    by_name = {c.name: c for c in result.checkpoints}
    assert report.passed, report.summary()
    assert by_name["logits"].passed and by_name["logits"].max_abs <= tolerance("fp32", "logits").atol
    assert by_name["norm.output"].passed  # the final norm runs on the last position on both sides
    assert result.generation.passed and len(result.generation.artifact_tokens) == 4


def _graph(norm_axis: int = -1, with_norm: bool = True, scaled: str = "h") -> ir.Model:
    """x [B, S, 8] -> h = x + x -> RMSNorm (statistic over ``norm_axis`` of h, applied to ``scaled``) -> MatMul
    [8, 16] -> logits; ``scaled`` "y" is a second graph input [B, S, 8]."""
    nodes, value = [helper.make_node("Add", ["x", "x"], ["h"])], "h"
    if with_norm:
        nodes += [helper.make_node("Pow", [value, "two"], ["sq"]),
                  helper.make_node("ReduceMean", ["sq", "axes"], ["mean"]),
                  helper.make_node("Add", ["mean", "eps"], ["var"]), helper.make_node("Sqrt", ["var"], ["std"]),
                  helper.make_node("Reciprocal", ["std"], ["inv"]),
                  helper.make_node("Mul", [scaled, "inv"], ["normed"])]
        value = "normed"
    nodes.append(helper.make_node("MatMul", [value, "w"], ["logits"]))
    inits = [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
             helper.make_tensor("axes", TensorProto.INT64, [1], [norm_axis]),
             helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-5]),
             helper.make_tensor("w", TensorProto.FLOAT, [8, 16], np.ones(128, np.float32))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", "S", 8])
                                           for n in ("x", "y")[: 2 if scaled == "y" else 1]],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "S", 16])], inits)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))


def test_refuses_a_graph_without_the_pattern(tmp_path):
    with pytest.raises(UnsupportedModelError, match=r"found no ReduceMean within \d+ elementwise ops before"):
        last_logits(_graph(with_norm=False))
    with pytest.raises(UnsupportedModelError, match="reduces another axis than the last"):
        last_logits(_graph(norm_axis=1))  # a "norm" over the sequence axis mixes positions
    with pytest.raises(UnsupportedModelError, match="the final norm .* reads the graph input 'y'"):
        last_logits(_graph(scaled="y"))  # the norm scales another value than the one it measures
    proto = ir.to_proto(_graph())
    proto.graph.output[0].name = "scores"
    proto.graph.node[-1].output[0] = "scores"
    with pytest.raises(UnsupportedModelError, match="no output named 'logits'.*optimize without --last-logits"):
        last_logits(ir.from_proto(proto))
    # the same graph with the pattern: rewritten, and it runs
    model = _graph()
    assert last_logits(model).count == 1
    onnx.checker.check_model(ir.to_proto(model))
    ir.save(model, tmp_path / "g.onnx")
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    (got,) = session(tmp_path / "g.onnx").run(None, {"x": x})
    h = 2 * x[:, -1:]
    np.testing.assert_allclose(got, (h / np.sqrt((h**2).mean(-1, keepdims=True) + 1e-5)) @ np.ones((8, 16)), rtol=1e-5)


def test_cli_flag_and_trt_refusal(canonical, tmp_path, capsys):
    _, src = canonical("tiny")
    parser = argparse.ArgumentParser(prog="moetrt optimize")
    optimize_cli.add_arguments(parser)
    out = tmp_path / "cli"
    assert optimize_cli.run(parser.parse_args([str(src), "-t", "ort-cpu", "-o", str(out), "--last-logits", "-q"])) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert json.loads((out / "moetrt.json").read_text())["optimize"]["last_logits"] is True
    assert parser.parse_args([str(src), "-t", "ort-cpu", "-o", "o"]).last_logits is False
    with pytest.raises(MoetrtError, match="--last-logits applies to the ONNX Runtime targets"):
        optimize(src, tmp_path / "x", "trt", last_logits=True, progress=False)
