"""convert_precision: an fp32 export becomes fp16 / bf16 with the router, softmax, norm statistics
and logits in fp32; ONNX Runtime CPU runs the fp16 graph within the fp16 tolerances."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from moetrt.optimize.moe_lowering import lower_moe
from moetrt.optimize.precision import convert_precision
from moetrt.parity import check_close, tolerance
from tests.optimize.helpers import apply_pass, batch_inputs, compare, feeds, node_counts, session

ort = pytest.importorskip("onnxruntime")

F32, F16, BF16 = ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16
TARGET = {"fp16": F16, "bf16": BF16}
# (batch, new tokens, past); row 1 of a batch is left-padded
SHAPES = [(1, 1, 0), (2, 1, 30), (3, 17, 0), (2, 9, 20), (1, 64, 0)]
FAMILY_VARIANTS = ["qwen2_moe-shared", "olmoe", "qwen3_moe"]


@pytest.fixture(scope="module")
def converted(canonical, tmp_path_factory):
    """(variant, precision) -> (reference, PassResult, model, path), cached."""
    cache = {}

    def get(variant, precision):
        if (variant, precision) not in cache:
            model, folder = canonical(variant)
            path = tmp_path_factory.mktemp(f"precision-{precision}") / "model.onnx"
            result, graph = apply_pass(folder, path, convert_precision, precision)
            cache[(variant, precision)] = (model, result, graph, path)
        return cache[(variant, precision)]

    return get


def _initializer(value: ir.Value) -> bool:
    return value is not None and value.is_initializer()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_structure(converted, precision):
    model, result, graph, path = converted("tiny", precision)
    target = TARGET[precision]
    onnx.checker.check_model(str(path), full_check=True)
    io = {v.name: v.dtype for v in list(graph.graph.inputs) + list(graph.graph.outputs)}
    assert io["logits"] == F32 and io["input_ids"] == ir.DataType.INT64
    assert all(io[n] == target for n in io if n.startswith(("past_key_values", "present")))
    seen = set()
    for node in graph.graph:
        seen.add(node.op_type)
        if node.op_type == "TopKRouting":
            logits = node.inputs[0]
            assert logits.dtype == F32
            router = logits.producer()
            assert router.op_type in ("Gemm", "MatMul") and router.outputs[0].dtype == F32
            assert [v.dtype for v in router.inputs if _initializer(v)] == [F32], "router weights stay fp32"
        elif node.op_type in ("Softmax", "Pow", "ReduceMean", "Sqrt", "Reciprocal", "Cos", "Sin"):
            assert all(v.dtype == F32 for v in node.inputs if v is not None and v.dtype in (F16, BF16, F32)), node
            assert node.outputs[0].dtype == F32, node
        elif node.op_type == "SparseMoE":
            x, weights, _, w_gate_up, w_down = node.inputs
            assert x.dtype == target and weights.dtype == F32 and w_gate_up.dtype == target and w_down.dtype == target
            assert node.outputs[0].dtype == target
        elif node.op_type == "MatMul":
            weight = [v for v in node.inputs if _initializer(v)]
            assert all(v.dtype == target for v in weight) and node.outputs[0].dtype == target
    assert {"TopKRouting", "SparseMoE", "Softmax", "MatMul"} <= seen
    # every big tensor is in the target dtype: fp32 weights are the router, norms and rotary frequencies
    for name, value in graph.graph.initializers.items():
        if value.dtype == F32:
            assert value.const_value.size <= model.config.hidden_size * model.config.num_experts, name
        if value.dtype == F16:
            assert np.isfinite(value.const_value.numpy()).all(), f"{name} overflowed fp16"
    assert result.count > 0 and result.details["constants_converted"] > 0


@pytest.mark.parametrize("batch,seq,past", SHAPES)
def test_fp16_matches_fp32_reference(converted, record_max, batch, seq, past):
    model, _, _, path = converted("tiny", "fp16")
    logits, kv, got = compare(model, session(path), batch, seq, past, dtype="fp16")
    assert got["logits"].dtype == np.float32 and got["present.0.key"].dtype == np.float16
    record_max("convert_precision fp16 max abs error vs fp32 reference (tiny logits)", f"b{batch} s{seq} p{past}",
               logits.max_abs)
    assert logits.ok, f"logits: {logits}"
    assert kv.ok, f"present KV: {kv}"


def test_fp16_long_prefill_is_tie_aware(canonical, tmp_path, record_max):
    """Over 200 tokens fp16 activations flip some router near-ties (as the PyTorch model run in
    fp16 does: token 78 of this prompt moves its logits by 6.5). Every flip must be a near-tie
    (the reference's gap between the k-th and (k+1)-th score under the fp16 router_gap
    tolerance) unless an earlier layer already flipped at this or an earlier token (then the
    hidden state it routes is already another one), and the logits must match up to the first flip."""
    model, folder = canonical("tiny", router_outputs=True)
    apply_pass(folder, tmp_path / "model.onnx", convert_precision, "fp16")
    ids, mask, positions = batch_inputs(model, 1, 200, 0)
    sess = session(tmp_path / "model.onnx")
    got = dict(zip([o.name for o in sess.get_outputs()],
                   sess.run(None, feeds(model, ids, mask, positions, None, np.float16))))
    with torch.no_grad():
        ref = model(ids, mask, positions, output_router=True)
    k, gap_tol = model.config.num_experts_per_tok, tolerance("fp16", "router_gap").atol
    first_flip = ids.shape[1]  # the first token flipped in any layer so far
    for n, layer in enumerate(model.config.moe_layers):
        scores = torch.softmax(ref.router_logits[n], -1).sort(-1, descending=True).values  # [T, E]
        ours, theirs = np.sort(got[f"router_indices.{layer}"], 1), np.sort(ref.router_indices[n].numpy(), 1)
        flipped = np.nonzero((ours != theirs).any(1))[0]
        for token in flipped[flipped < first_flip]:  # later tokens see an earlier flip through attention
            gap = float(scores[token, k - 1] - scores[token, k])
            assert gap < gap_tol, f"layer {layer} token {token}: experts differ with a score gap of {gap:.2e}"
        first_flip = min([first_flip, *flipped.tolist()])
    assert first_flip > 16, "the prompt should not flip that early"
    logits = check_close(got["logits"][0, :first_flip], ref.logits[0, :first_flip].numpy(), tolerance("fp16", "logits"))
    record_max("convert_precision fp16 max abs error vs fp32 reference (tiny logits)", "b1 s200 up to a near-tie flip",
               logits.max_abs)
    assert logits.ok, str(logits)


@pytest.mark.parametrize("variant", FAMILY_VARIANTS)
def test_fp16_families(converted, record_max, variant):
    model, _, _, path = converted(variant, "fp16")
    sess = session(path)
    for batch, seq, past in [(1, 1, 0), (2, 9, 20)]:
        logits, kv, _ = compare(model, sess, batch, seq, past, dtype="fp16", seed=seq)
        record_max("convert_precision fp16 max abs error vs fp32 reference (families)", variant, logits.max_abs)
        assert logits.ok, f"{variant}: {logits}"
        assert kv.ok, f"{variant}: {kv}"


def test_bf16_runs_where_onnx_runtime_has_kernels(converted):
    model, _, _, path = converted("tiny", "bf16")
    try:
        sess = session(path)
    except Exception as exc:  # ORT's CPU EP has almost no bfloat16 kernels
        pytest.skip(f"ONNX Runtime {ort.__version__} CPU cannot run bf16 graphs (structure is tested above): "
                    f"{str(exc).splitlines()[0][:160]}")
    logits, kv, _ = compare(model, sess, 2, 9, 20, dtype="bf16")
    assert logits.ok and kv.ok, (logits, kv)


def test_fp16_then_lowering_for_a_float16_target(converted, tmp_path):
    """On a target that runs the fused op in fp16 (CUDA), the router logits are cast at its input."""
    model, _, graph, _ = converted("tiny", "fp16")
    graph = ir.from_proto(ir.to_proto(graph))  # a copy
    result = lower_moe(graph, (F16, BF16), policy="always")
    assert result.count == len(model.config.moe_layers)
    for node in graph.graph:
        if node.op_type == "MoE":
            assert node.inputs[0].dtype == F16 and node.inputs[2].dtype == F16
            cast = node.inputs[1].producer()
            assert cast.op_type == "Cast" and cast.attributes["to"].value == F16 and cast.inputs[0].dtype == F32
    assert node_counts(graph)["moetrt::SparseMoE"] == 0


def test_rejects_graphs_that_are_not_fp32(converted):
    _, _, graph, _ = converted("tiny", "fp16")
    with pytest.raises(ValueError, match="expects a float32 graph"):
        convert_precision(ir.from_proto(ir.to_proto(graph)), "bf16")
    with pytest.raises(ValueError, match="precision must be one of fp16, bf16"):
        convert_precision(graph, "fp8")


def test_rejects_lowered_graphs(canonical, tmp_path):
    _, folder = canonical("tiny")
    graph = ir.load(folder / "model.onnx")
    lower_moe(graph, policy="auto")
    with pytest.raises(ValueError, match="convert precision before lowering"):
        convert_precision(graph, "fp16")
