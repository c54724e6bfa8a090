"""quantize_weights: weight-only block-wise int8/int4 of the non-expert weights as com.microsoft::MatMulNBits.

Four kinds of check: the block format (round trip within half a step, ONNX Runtime's own
quantizer's bytes for blocks with zero points); the graph (MatMulNBits where the linear layers
were, the router untouched) with its numbers (on fp32 activations, exactly what the same graph
computes with the dequantized weights; with the default int8 activations, the fp32 reference
within the bounds justified below); the optimize() options and errors; and the quality cost on
the trained ``tiny`` model (held-out perplexity against fp32).
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
import torch

import moetrt
from moetrt.errors import MoetrtError
from moetrt.optimize import optimize
from moetrt.optimize.weight_quantization import (
    MIN_OUTPUTS, dequantize_matmul_weight, quantize_matmul_weight, quantize_weights,
)
from moetrt.parity import Tolerance, check_close
from tests.optimize.helpers import (
    apply_pass, batch_inputs, feeds, heldout_eval, heldout_stream, node_counts, session, swapped_nibbles,
)

pytest.importorskip("onnxruntime")

BITS = {"int8": 8, "int4": 4}
# a small random model with every kind of linear layer: a dense layer (0), a shared expert with
# its scalar gate (Gemm, transB=1), attention biases, tied embeddings (lm_head is a separate
# transposed copy: quantized; the Gather's table is not)
RANDOM = moetrt.MoEConfig(
    vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    num_experts=4, num_experts_per_tok=2, intermediate_size=32, shared_expert_intermediate_size=48,
    attention_bias=True, tie_word_embeddings=True, mlp_only_layers=(0,), dense_intermediate_size=80,
    normalize_topk=False,
)
MODELS = {"tiny": "tiny", "random": RANDOM}
# (model, MatMulNBits expected, linear layers left alone): tiny: 4 layers x (q, k, v, o) + lm_head, its
# 4 routers left; random: 2 x (q, k, v, o) + dense MLP (3) + shared expert (3) + lm_head, router and gate left
EXPECTED = {"tiny": (17, 4), "random": (15, 2)}
SHAPES = [(1, 1, 0), (2, 9, 20), (1, 64, 0)]
# With the activations in fp32 (accuracy_level 0), MatMulNBits computes A @ dequant(B): the graph
# must equal the same graph with the dequantized weights up to fp32 summation order.
EXACT = Tolerance(2e-4, 1e-4, "A @ dequant(B) in fp32, MLAS's block-wise sums in another order than MatMul's")
# Against the fp32 model, with the default int8 activations: the median over real token positions of
# max |error| / max |reference| of the logits. Per linear layer, symmetric int8 blocks leave each weight off
# by at most max|w_block| / 254 (relative RMS ~0.5% for blocks of 32 Gaussian-like weights) and int8
# activations per block add as much again: ~0.7% per layer; tiny's logits pass 9 quantized layers on the
# longest path (2 per block + lm_head), random's 5 with weights of std 0.2 that no training has damped,
# so errors of independent layers in quadrature give ~2% (tiny) and ~3% (random). The median, not the
# max: a position whose router held a near-tie may pick another expert when its input moves by ~1%,
# which the project's parity rule allows (router decisions compare tie-aware) and which changes that
# position's logits by far more than the quantization noise; random tokens on the trained tiny model make
# such ties common (measured: max over positions up to 36% for int8). int4 (step max|w| / 7: relative RMS
# ~8% per weight) is bounded on the trained model only; its real measure is the perplexity below.
# Measured medians over 3 seeds: tiny int8 0.3-0.5%, random int8 1.5-2.7%, tiny int4 5-6%.
FP32_BOUND = {("tiny", "int8"): 0.02, ("random", "int8"): 0.05, ("tiny", "int4"): 0.12}
# Held-out perplexity of tiny against fp32. The non-expert weights are 1/3 of tiny's linear weights
# but every token reads all of them (vs 2 of 8 experts), and attention errors move every later
# position: the same reasoning as the experts' bounds (tests/optimize/test_expert_quantization.py),
# second order in the weight error, (0.5 / 8)^2 ~ 1/250 from int4 to int8. Measured: -0.006% (int8),
# +0.33% (int4), +0.68% (int4 experts + int8 weights; int4 experts alone: +0.72%) on the retrained tiny. The bounds leave room for retraining the preset and
# still fail on layout errors (a swapped nibble order, asserted below).
PERPLEXITY_BOUND = {"int8": 1.005, "int4": 1.03, "int4 experts + int8": 1.02}


# --- the block format ------------------------------------------------------------------------------
@pytest.mark.parametrize("K,N,block", [(64, 32, 32), (48, 20, 32), (256, 16, 128), (64, 24, 16)])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_trip(K, N, block, bits, symmetric):
    rng = np.random.default_rng(K + N)
    w = (rng.standard_normal((K, N)) * rng.uniform(0.01, 2, (1, N))).astype(np.float32)
    w[:block, 0] = 0.0  # an all-zero block
    w[:, 1] = np.abs(w[:, 1])  # one-sided blocks: zero points help there
    packed, scales, zero_points = quantize_matmul_weight(w, bits, block, symmetric)
    k_blocks = -(-K // block)
    assert packed.dtype == np.uint8 and packed.shape == (N, k_blocks, block * bits // 8)
    assert scales.dtype == np.float32 and scales.shape == (N, k_blocks)
    if symmetric:
        assert zero_points is None
    else:
        assert zero_points.dtype == np.uint8 and zero_points.shape == (N, -(-k_blocks * bits // 8))
    back = dequantize_matmul_weight(packed, scales, zero_points, bits, block, K)
    assert back.shape == (K, N)
    step = np.repeat(scales.T, block, axis=0)[:K]  # [K, N]
    assert np.all(np.abs(back - w) <= step / 2 + 1e-6 * np.abs(w).max()), (bits, symmetric)
    assert np.all(back[:block, 0] == 0.0)


@pytest.mark.parametrize("bits", [8, 4])
def test_zero_point_blocks_are_onnxruntime_quantizers(bits):
    """With zero points, the bytes are ONNX Runtime's own quantizer's (matmul_nbits_quantizer's C++ kernel),
    but for values exactly halfway between two steps, which that kernel may round the other way."""
    from onnxruntime.capi import _pybind_state as C

    K, N, block = 128, 24, 32
    w = np.random.default_rng(bits).standard_normal((K, N)).astype(np.float32)
    packed, scales, zero_points = quantize_matmul_weight(w, bits, block, symmetric=False)
    theirs = (np.zeros_like(packed), np.zeros_like(scales), np.zeros_like(zero_points))
    getattr(C, f"quantize_matmul_{bits}bits")(*theirs[:1], w, *theirs[1:], block, N, K, False)
    np.testing.assert_array_equal(scales, theirs[1])
    np.testing.assert_array_equal(zero_points, theirs[2])
    assert np.mean(packed == theirs[0]) > 0.995


def test_int4_nibble_order_is_matmulnbits():
    """K index 2i in the low nibble, 2i+1 in the high one; stored value = q + 8; zero points likewise."""
    w = np.zeros((16, 16), np.float32)
    w[:4, 0] = [-7, 7, 0, 1]  # column 0, block 0: max|w| = 7, scale 1
    packed, scales, _ = quantize_matmul_weight(w, 4, 16)
    assert scales[0, 0] == 1.0
    assert packed[0, 0, :2].tolist() == [(8 + 7) << 4 | (8 - 7), (8 + 1) << 4 | 8]
    w = np.ones((48, 16), np.float32)  # 3 blocks of 16, all positive: zero point 0
    w[16:32] = -1.0  # the second block all negative: zero point 15
    _, _, zero_points = quantize_matmul_weight(w, 4, 16, symmetric=False)
    assert zero_points.shape == (16, 2) and zero_points[0].tolist() == [15 << 4 | 0, 0]


# --- the graph and its numbers -------------------------------------------------------------------
@pytest.fixture(scope="module")
def quantized(canonical, tmp_path_factory):
    """(model, scheme, symmetric, accuracy_level) -> (reference, canonical folder, PassResult, graph, session path)."""
    cache = {}

    def get(name, scheme, symmetric=True, accuracy_level=4):
        key = (name, scheme, symmetric, accuracy_level)
        if key not in cache:
            model, folder = canonical(MODELS[name])
            path = tmp_path_factory.mktemp(f"w-{name}-{scheme}") / "model.onnx"
            result, graph = apply_pass(folder, path, quantize_weights, scheme, symmetric=symmetric,
                                       accuracy_level=accuracy_level)
            cache[key] = (model, folder, result, graph, path)
        return cache[key]

    return get


def _dequantized_twin(folder, graph: ir.Model, out):
    """The canonical graph with every weight MatMulNBits replaced by dequantize(quantize(w)): saved to ``out``."""
    twin = ir.load(folder / "model.onnx")
    for node in graph.graph:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {k: a.value for k, a in node.attributes.items()}
        b, scales, zero_points = (list(node.inputs) + [None])[1:4]
        w = dequantize_matmul_weight(b.const_value.numpy(), scales.const_value.numpy(),
                                     zero_points.const_value.numpy() if zero_points is not None else None,
                                     attrs["bits"], attrs["block_size"], attrs["K"])  # [K, N]
        original = twin.graph.initializers[b.name.rsplit(".q", 1)[0]]
        if tuple(original.shape) != w.shape:  # a Gemm's transB=1 weight [N, K]
            w = w.T
        original.const_value = ir.tensor(np.ascontiguousarray(w), name=original.name)
    ir.save(twin, out)
    return out


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("scheme,symmetric", [("int8", True), ("int4", True), ("int4", False), ("int8", False)])
def test_structure_and_dequantized_twin(quantized, tmp_path, record_max, name, scheme, symmetric):
    model, folder, result, graph, path = quantized(name, scheme, symmetric, accuracy_level=0)
    expected, left = EXPECTED[name]
    counts = node_counts(graph)
    before = node_counts(ir.load(folder / "model.onnx"))
    # structure: every weight linear layer is a MatMulNBits, the router (and the scalar gate) are not
    assert result.count == expected and counts["com.microsoft::MatMulNBits"] == expected
    assert len(result.skipped) == left and all("router" in why or f"< {MIN_OUTPUTS}" in why
                                               for why in result.skipped.values()), result.skipped
    assert counts["MatMul"] + counts["Gemm"] == before["MatMul"] + before["Gemm"] - expected
    for node in graph.graph:
        if node.op_type in ("MatMul", "Gemm"):
            weight = node.inputs[1]
            if weight.is_initializer():  # only the routers (and scalar gates) keep an fp32 weight
                assert node.name in result.skipped, node.name
                assert weight.dtype == ir.DataType.FLOAT
        if node.op_type != "MatMulNBits":
            continue
        attrs = {k: a.value for k, a in node.attributes.items()}
        K, N, bits = attrs["K"], attrs["N"], attrs["bits"]
        assert node.domain == "com.microsoft" and bits == BITS[scheme] and attrs["block_size"] == 32
        assert "accuracy_level" not in attrs  # 0: not written, as ONNX Runtime's quantizer does
        b, scales = node.inputs[1], node.inputs[2]
        assert b.dtype == ir.DataType.UINT8 and tuple(b.shape) == (N, -(-K // 32), 32 * bits // 8)
        assert scales.dtype == ir.DataType.FLOAT and tuple(scales.shape) == (N, -(-K // 32))
        assert (len(node.inputs) > 3 and node.inputs[3] is not None) == (not symmetric)
    routers = [n for n in graph.graph if n.name in result.skipped]
    assert routers and all(n.op_type == "Gemm" for n in routers)  # untouched: same op, same fp32 weight
    assert result.details["weight_bytes_after"] < result.details["weight_bytes_before"] * (BITS[scheme] + 2) / 32
    # numbers: exactly the dequantized weights' math
    twin = session(_dequantized_twin(folder, graph, tmp_path / "twin.onnx"))
    sess = session(path)
    for batch, seq, past in SHAPES:
        ids, mask, positions = batch_inputs(model, batch, seq + past, 0, seed=seq)
        inputs = feeds(model, ids, mask, positions, None)
        want, got = twin.run(None, inputs), sess.run(None, inputs)
        for output, a, e in zip(sess.get_outputs(), got, want):
            close = check_close(a, e, EXACT)
            record_max("quantize_weights (fp32 activations) vs dequantized twin: max abs", f"{name} {scheme}",
                       close.max_abs)
            assert close.ok, f"{output.name} {batch}x{seq}: {close}"


def _median_logits_error(model, sess, kv_dtype=np.float32) -> tuple[float, float]:
    """(median, max) over real positions of max |error| / max |reference| of the logits, against the PyTorch model."""
    errors = []
    for batch, seq in [(1, 1), (2, 9), (1, 64)]:
        for seed in range(3):
            ids, mask, positions = batch_inputs(model, batch, seq, 0, seed=seed)
            with torch.no_grad():
                want = model(ids, mask, positions).logits.numpy()  # [B, S, V]
            got = sess.run(["logits"], feeds(model, ids, mask, positions, None, kv_dtype))[0]
            real = mask.bool().numpy()
            errors += list(np.abs(got - want)[real].max(-1) / np.abs(want[real]).max())
    return float(np.median(errors)), float(max(errors))


@pytest.mark.parametrize("name,scheme", list(FP32_BOUND))
def test_matches_fp32_reference_within_bound(quantized, record_max, name, scheme):
    """optimize's default: symmetric blocks of 32, int8 activations (accuracy_level 4), against the PyTorch model."""
    model, _, result, _, path = quantized(name, scheme)
    assert result.details["accuracy_level"] == 4
    median, worst = _median_logits_error(model, session(path))
    record_max("quantize_weights vs fp32 reference: median over positions of max |error| / max |logits|",
               f"{name} {scheme}", median)
    assert median <= FP32_BOUND[(name, scheme)], (median, worst)


def test_fp16_activations(canonical, tmp_path, record_max):
    """--precision fp16 --quantize-weights int8 on ort-cpu: scales in fp16, the same bound as fp32 activations
    (fp16 rounding, ~0.05% per op, is far below the int8 steps)."""
    model, src = canonical("tiny")
    out = optimize(src, tmp_path / "fp16", precision="fp16", quantize_weights="int8", progress=False)
    graph = ir.load(out / "model.onnx")
    nbits = [n for n in graph.graph if n.op_type == "MatMulNBits"]
    assert len(nbits) == 17 and {n.inputs[2].dtype for n in nbits} == {ir.DataType.FLOAT16}
    assert {n.inputs[0].dtype for n in nbits} == {ir.DataType.FLOAT16}
    median, worst = _median_logits_error(model, session(out / "model.onnx"), np.float16)
    record_max("quantize_weights vs fp32 reference: median over positions of max |error| / max |logits|",
               "tiny int8 fp16", median)
    assert median <= FP32_BOUND[("tiny", "int8")], (median, worst)


def test_gemm_with_bias_and_either_layout(tmp_path):
    """Gemm(A, W, C) with transB 0 and 1: the bias goes to MatMulNBits' bias input, W read the right way round."""
    rng = np.random.default_rng(0)
    K, N = 64, 32
    w = rng.standard_normal((K, N)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    x = rng.standard_normal((5, K)).astype(np.float32)
    want = x @ dequantize_matmul_weight(*quantize_matmul_weight(w, 4, 32), 4, 32, K) + bias
    for trans_b in (0, 1):
        a = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([None, K]))
        weight = ir.Value(name="w", const_value=ir.tensor(w.T.copy() if trans_b else w, name="w"))
        c = ir.Value(name="c", const_value=ir.tensor(bias, name="c"))
        node = ir.node("Gemm", [a, weight, c], attributes={"transB": trans_b}, name="linear")
        node.outputs[0].name, node.outputs[0].type = "y", ir.TensorType(ir.DataType.FLOAT)
        node.outputs[0].shape = ir.Shape([None, N])
        graph = ir.Graph([a], node.outputs, nodes=[node], initializers=[weight, c], opset_imports={"": 17})
        model = ir.Model(graph, ir_version=10)
        result = quantize_weights(model, "int4")
        assert result.count == 1
        (nbits,) = list(model.graph)
        assert nbits.op_type == "MatMulNBits" and nbits.inputs[5].name == "w.q4.bias" and nbits.inputs[3] is None
        ir.save(model, tmp_path / f"gemm{trans_b}.onnx")
        got = session(tmp_path / f"gemm{trans_b}.onnx").run(None, {"x": x})[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_weight_shared_by_two_layers(tmp_path):
    """One initializer read by two MatMuls: each gets its own quantized copy, under distinct names."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    a = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([None, 32]))
    weight = ir.Value(name="w", const_value=ir.tensor(w, name="w"))
    first = ir.node("MatMul", [a, weight], name="first")
    second = ir.node("MatMul", [a, weight], name="second")
    for node, name in ((first, "y1"), (second, "y2")):
        node.outputs[0].name, node.outputs[0].type = name, ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([a], [first.outputs[0], second.outputs[0]], nodes=[first, second], initializers=[weight],
                     opset_imports={"": 17})
    model = ir.Model(graph, ir_version=10)
    assert quantize_weights(model, "int8").count == 2
    names = [n.inputs[1].name for n in model.graph]
    assert len(set(names)) == 2 and "w" not in model.graph.initializers, names
    ir.save(model, tmp_path / "shared.onnx")
    x = rng.standard_normal((3, 32)).astype(np.float32)
    y1, y2 = session(tmp_path / "shared.onnx").run(None, {"x": x})
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_allclose(y1, x @ w, atol=0.05 * np.abs(x @ w).max())  # int8 weights and activations


def test_bad_arguments():
    model = ir.Model(ir.Graph([], [], nodes=[]), ir_version=10)
    with pytest.raises(ValueError, match="scheme must be one of int8, int4"):
        quantize_weights(model, "int2")
    with pytest.raises(ValueError, match="power of two >= 16"):
        quantize_weights(model, "int4", 48)


# --- optimize() and its options ------------------------------------------------------------------
def test_optimize_records_the_pass_and_runs(canonical, tmp_path):
    model, src = canonical("tiny")
    out = optimize(src, tmp_path / "q", quantize_experts="int4", quantize_weights="int8", block_size=64,
                   weight_block_size=64, weight_zero_points=True, progress=False)
    meta = json.loads((out / "moetrt.json").read_text())["optimize"]
    assert (meta["quantize_weights"], meta["block_size"], meta["weight_block_size"], meta["weight_activations"],
            meta["weight_zero_points"]) == ("int8", 64, 64, "int8", True)
    passes = {p["name"]: p for p in meta["passes"]}
    assert list(passes) == ["group_attention", "quantize_weights_int8", "quantize_experts_int4", "lower_moe"]
    assert passes["quantize_weights_int8"]["count"] == 17 and len(passes["quantize_weights_int8"]["skipped"]) == 4
    counts = node_counts(ir.load(out / "model.onnx"))
    assert counts["com.microsoft::MatMulNBits"] == 17 and counts["com.microsoft::QMoE"] == 4
    nbits = [n for n in ir.load(out / "model.onnx").graph if n.op_type == "MatMulNBits"]
    assert {(n.attributes["block_size"].value, n.attributes["accuracy_level"].value) for n in nbits} == {(64, 4)}
    from moetrt.runtime import Session

    result = Session(out, backend="ort").generate([[5, 6, 7]], max_new_tokens=3, stop_tokens=())
    assert len(result.tokens[0]) == 3


@pytest.mark.parametrize("scheme,weight_blocks", [("int8", 128), ("int4", 32)])
def test_default_blocks(canonical, tmp_path, scheme, weight_blocks):
    """int8 weights in blocks of 128 (targets.DEFAULT_WEIGHT_BLOCK_SIZE), int4 weights and the experts in 32."""
    _, src = canonical("tiny")
    out = optimize(src, tmp_path / "q", quantize_experts="int4", quantize_weights=scheme, progress=False)
    graph = ir.load(out / "model.onnx")
    assert {n.attributes["block_size"].value for n in graph.graph if n.op_type == "MatMulNBits"} == {weight_blocks}
    assert {n.attributes["block_size"].value for n in graph.graph if n.op_type == "QMoE"} == {32}
    meta = json.loads((out / "moetrt.json").read_text())["optimize"]
    assert (meta["block_size"], meta["weight_block_size"]) == (32, weight_blocks)


@pytest.mark.parametrize("kwargs,match", [
    (dict(target="trt", quantize_weights="int8"), "--quantize-weights applies to the ONNX Runtime targets"),
    (dict(quantize_weights="int8", weight_block_size=48), "weight_block_size must be a power of two >= 16"),
    (dict(quantize_weights="int2"), "unknown weight quantization 'int2'; choose one of int8, int4"),
    (dict(quantize_weights="int8", weight_activations="fp32"), "no 8-bit kernel on fp32 activations"),
    (dict(quantize_weights="int4", weight_activations="int16"), "unknown weight_activations"),
    (dict(quantize_weights="int4", precision="bf16"), "MatMulNBits in fp32, fp16 only, not bf16"),
])
def test_optimize_refuses_with_the_fix(canonical, tmp_path, kwargs, match):
    _, src = canonical("tiny")
    kwargs = {"target": "ort-cpu", **kwargs}
    with pytest.raises(MoetrtError, match=match):
        optimize(src, tmp_path / "x", progress=False, **kwargs)
    assert not (tmp_path / "x").exists()


def test_cli_passes_the_options(canonical, tmp_path, capsys):
    import argparse

    from moetrt.optimize import cli

    _, src = canonical("tiny")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    out = tmp_path / "cli"
    args = parser.parse_args([str(src), "-t", "ort-cpu", "-o", str(out), "-q", "--quantize-weights", "int4",
                              "--weight-activations", "fp32", "--moe-lowering", "off"])
    assert cli.run(args) == 0 and capsys.readouterr().out.strip() == str(out)
    meta = json.loads((out / "moetrt.json").read_text())["optimize"]
    assert (meta["quantize_weights"], meta["weight_activations"], meta["weight_zero_points"]) == ("int4", "fp32", False)
    nbits = [n for n in ir.load(out / "model.onnx").graph if n.op_type == "MatMulNBits"]
    assert len(nbits) == 17 and all("accuracy_level" not in n.attributes for n in nbits)


# --- quality on the trained model ------------------------------------------------------------------
@pytest.fixture(scope="module")
def heldout(canonical):
    ids = heldout_stream()
    _, folder = canonical("tiny")
    return ids, heldout_eval(session(folder / "model.onnx"), ids)[0]


@pytest.mark.parametrize("what", list(PERPLEXITY_BOUND))
def test_tiny_heldout_perplexity_within_bound(canonical, heldout, tmp_path, record_max, what):
    """optimize's defaults (symmetric blocks of 32, int8 activations) on the trained tiny model."""
    ids, ppl_fp32 = heldout
    _, src = canonical("tiny")
    experts = dict(quantize_experts="int4") if what.startswith("int4 experts") else {}
    out = optimize(src, tmp_path / "q", quantize_weights=what.split()[-1], progress=False, **experts)
    ppl, _ = heldout_eval(session(out / "model.onnx"), ids)
    record_max("tiny heldout perplexity / fp32 - 1 (quantize_weights)", what, ppl / ppl_fp32 - 1)
    assert ppl / ppl_fp32 <= PERPLEXITY_BOUND[what], f"{what}: {ppl:.4f} vs fp32 {ppl_fp32:.4f}"


def test_a_wrong_layout_breaks_the_bound(quantized, heldout, tmp_path):
    """The perplexity bound catches layout errors: the two nibbles of every int4 byte swapped."""
    ids, ppl_fp32 = heldout
    _, _, _, graph, _ = quantized("tiny", "int4")
    ir.save(swapped_nibbles(graph), tmp_path / "model.onnx")
    ppl, _ = heldout_eval(session(tmp_path / "model.onnx"), ids)
    assert ppl / ppl_fp32 > 2 * PERPLEXITY_BOUND["int4"], ppl
