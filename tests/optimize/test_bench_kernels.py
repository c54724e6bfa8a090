"""The quantized CPU benchmark's one-node kernel models (benchmarks/bench_quantized_cpu.py): each computes
what its node computes inside the full optimized graph, and the one-model step computes what they do."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    if str(BENCHMARKS) not in sys.path:  # the benchmark puts its folder on the path itself, for its siblings
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module("bench_quantized_cpu")


def _session(model_bytes):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def test_one_node_models_match_the_nodes_in_the_full_graph(bench, optimized_variant):
    _, _, folder = optimized_variant("tiny", quantize_experts="int4", quantize_weights="int8")
    kernels = bench.weight_kernels(folder)
    assert {k.op_type for k in kernels} == {"QMoE", "MatMulNBits", "Gemm"}  # experts, projections + lm_head, routers

    # the full graph at a decode shape (batch 1, T=1, empty past), every kernel's inputs and output exposed
    full = onnx.load(str(folder / "model.onnx"))
    seen = {o.name for o in full.graph.output}
    for name in dict.fromkeys(n for k in kernels for n in [*k.inputs, k.output]):
        if name not in seen:
            full.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = _session(full.SerializeToString())
    feeds = {"input_ids": np.array([[7]]), "attention_mask": np.ones((1, 1), np.int64),
             "position_ids": np.zeros((1, 1), np.int64)}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros([1, i.shape[1], 0, i.shape[3]], np.float32)
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(names, feeds)))

    for kernel in kernels:
        inputs = {name: values[name] for name in kernel.inputs}
        for name, (shape, _) in kernel.inputs.items():  # the decode shapes the benchmark feeds
            assert list(inputs[name].shape) == shape, (kernel.name, name)
        got = _session(kernel.model.SerializeToString()).run([kernel.output], inputs)[0]
        np.testing.assert_array_equal(got, values[kernel.output], err_msg=kernel.name)

    # bytes: K/E of the experts', every other initializer whole; together under the decode step's bytes
    qmoe = next(k for k in kernels if k.op_type == "QMoE")
    node = qmoe.model.graph.node[0]
    k, experts = next(a.i for a in node.attribute if a.name == "k"), qmoe.inputs[node.input[1]][0][1]
    whole = sum(t.raw_data.__len__() for t in qmoe.model.graph.initializer)
    assert qmoe.bytes == int(whole * k / experts)
    assert sum(k.bytes for k in kernels) < bench.ort_bench.decode_bytes_per_token(folder, 1)


def test_one_model_step_computes_the_kernels(bench, optimized_variant):
    _, _, folder = optimized_variant("tiny", quantize_experts="int4", quantize_weights="int8")
    kernels = bench.weight_kernels(folder)
    model, renames = bench.step_model(kernels)
    feeds = {renames[i][name]: value for i, kernel in enumerate(kernels)
             for name, value in bench.decode_feeds(kernel, seed=i).items()}
    outputs = [rename[k.output] for k, rename in zip(kernels, renames)]
    together = dict(zip(outputs, _session(model.SerializeToString()).run(outputs, feeds)))
    for i, kernel in enumerate(kernels):
        alone = _session(kernel.model.SerializeToString()).run([kernel.output], bench.decode_feeds(kernel, seed=i))[0]
        np.testing.assert_array_equal(together[renames[i][kernel.output]], alone, err_msg=kernel.name)
    qmoe = next(k for k in kernels if k.op_type == "QMoE")
    route = bench.decode_feeds(qmoe)[qmoe.model.graph.node[0].input[1]]  # [1, E]: the first K experts chosen
    k = next(a.i for a in qmoe.model.graph.node[0].attribute if a.name == "k")
    assert route.shape[0] == 1 and set(np.flatnonzero(route[0] == route.max())) == set(range(k))
