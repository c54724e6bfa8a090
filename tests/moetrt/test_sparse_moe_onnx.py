"""``moetrt::SparseMoE``'s ONNX function body in ONNX Runtime, one body per variant.

Each variant (activation x which biases the node passes) gets its own body; the silu/no-bias body
is the version-1 one. Every variant runs on both paths of the body (the gather path of decode
steps and the sorted prefill path), with experts no token picks, T=0, T=1 and k=E, in fp32 and
fp16, against the NumPy reference and the torch op. The body never compares a string attribute
(TensorRT's parser rejects string Constants), and reads alpha and limit from the node.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from moetrt.ops import sparse_moe_reference
from moetrt.ops._onnx import DOMAIN, DOMAIN_VERSION
from moetrt.ops.sparse_moe import SPEC, onnx_function
from moetrt.parity import check_close, tolerance

ort = pytest.importorskip("onnxruntime")

SparseMoE = torch.ops.moetrt.SparseMoE
OPSET = 20
# (activation, b_gate_up?, b_down?)
BODIES = [
    ("silu", False, False), ("silu", True, True),
    ("clamped_swiglu", False, False), ("clamped_swiglu", True, False),
    ("clamped_swiglu", False, True), ("clamped_swiglu", True, True),
    ("gelu_tanh", False, False),  # Gemma 4's GeGLU
]
BODY_IDS = [f"{a}" + "-bgu" * g + "-bd" * d for a, g, d in BODIES]
# (tokens T, experts E, routed K, model dim D, expert dim F); T*K < E takes the gather path by default
SHAPES = [(1, 8, 2, 16, 8), (13, 6, 2, 12, 10), (9, 4, 4, 16, 8), (0, 5, 2, 8, 4), (7, 3, 1, 4, 6)]
# gather_below: 1 leaves out the gather path, a huge value always takes it, None chooses by T*K
PATHS = {"sorted": 1, "gather": 1 << 30, "run-time choice": None}
NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}
ONNX_DTYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}


@functools.cache
def _session(num_experts, gather_below, activation, gate_up_bias, down_bias, dtype, attrs=()):
    function = onnx_function(OPSET, num_experts, gather_below, activation=activation, gate_up_bias=gate_up_bias,
                             down_bias=down_bias, weight_input=dict(attrs).get("weight_input", 0))
    elem = ONNX_DTYPES[dtype]
    inputs = ["x", "weights", "indices", "w_gate_up", "w_down"]
    infos = [
        helper.make_tensor_value_info("x", elem, ["T", "D"]),
        helper.make_tensor_value_info("weights", TensorProto.FLOAT, ["T", "K"]),
        helper.make_tensor_value_info("indices", TensorProto.INT32, ["T", "K"]),
        helper.make_tensor_value_info("w_gate_up", elem, [num_experts, "F2", "D"]),
        helper.make_tensor_value_info("w_down", elem, [num_experts, "D", "F"]),
    ]
    if gate_up_bias:
        infos.append(helper.make_tensor_value_info("b_gate_up", elem, [num_experts, "F2"]))
    if gate_up_bias or down_bias:
        inputs.append("b_gate_up" if gate_up_bias else "")
    if down_bias:
        infos.append(helper.make_tensor_value_info("b_down", elem, [num_experts, "D"]))
        inputs.append("b_down")
    node = helper.make_node("SparseMoE", inputs, ["y"], domain=DOMAIN,
                            **SPEC.non_default({"activation": activation, **dict(attrs)}))
    graph = helper.make_graph([node], "op", infos, [helper.make_tensor_value_info("y", elem, ["T", "D"])])
    model = helper.make_model(graph, functions=[function], opset_imports=[
        helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)])
    onnx.checker.check_model(model, full_check=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _case(tokens, experts, k, dim, ffn, gate_up_bias, down_bias, scale=1.0, seed=0):
    """Routes that leave expert 0 unpicked (where E > k); weights and biases of an unpicked expert are NaN."""
    gen = np.random.default_rng(seed)
    pool = np.arange(1, experts) if experts > k else np.arange(experts)
    indices = np.array([gen.permutation(pool)[:k] for _ in range(tokens)], np.int32).reshape(tokens, k)
    feeds = {
        "x": (gen.standard_normal((tokens, dim)) * scale).astype(np.float32),
        "weights": gen.uniform(0.0, 1.0, (tokens, k)).astype(np.float32),
        "indices": indices,
        "w_gate_up": (gen.standard_normal((experts, 2 * ffn, dim)) * 0.3).astype(np.float32),
        "w_down": (gen.standard_normal((experts, dim, ffn)) * 0.3).astype(np.float32),
    }
    if gate_up_bias:
        feeds["b_gate_up"] = (gen.standard_normal((experts, 2 * ffn)) * 0.5).astype(np.float32)
    if down_bias:
        feeds["b_down"] = (gen.standard_normal((experts, dim)) * 0.5).astype(np.float32)
    if experts > k:
        for name in ("w_gate_up", "w_down", "b_gate_up", "b_down"):
            if name in feeds:
                feeds[name][0] = np.nan
    return feeds


def _in_dtype(feeds, dtype):
    return {n: v.astype(NP_DTYPES[dtype]) if n not in ("weights", "indices") else v for n, v in feeds.items()}


def _reference(feeds, **attrs):
    f = {n: v.astype(np.float32) if v.dtype == np.float16 else v for n, v in feeds.items()}
    return sparse_moe_reference(f["x"], f["weights"], f["indices"], f["w_gate_up"], f["w_down"], f.get("b_gate_up"),
                                f.get("b_down"), **attrs)


def _torch(feeds, **attrs):
    t = {n: torch.from_numpy(v) for n, v in feeds.items()}
    return SparseMoE(t["x"], t["weights"], t["indices"], t["w_gate_up"], t["w_down"], t.get("b_gate_up"),
                     t.get("b_down"), **attrs).numpy()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("activation,gate_up_bias,down_bias", BODIES, ids=BODY_IDS)
@pytest.mark.parametrize("tokens,experts,k,dim,ffn", SHAPES)
def test_body_matches_reference_fp32(tokens, experts, k, dim, ffn, activation, gate_up_bias, down_bias, path):
    # scale 3: many gate/up values beyond the clamped activation's limit of 7
    feeds = _case(tokens, experts, k, dim, ffn, gate_up_bias, down_bias, scale=3.0, seed=tokens + experts)
    got = _session(experts, PATHS[path], activation, gate_up_bias, down_bias, "fp32").run(None, feeds)[0]
    ref = _reference(feeds, activation=activation)
    assert got.shape == (tokens, dim) and got.dtype == np.float32
    for what, value in (("onnx", got), ("torch", _torch(feeds, activation=activation))):
        close = check_close(value, ref, tolerance("fp32", "hidden"))
        assert close.ok, f"{what} vs NumPy reference: {close}"


@pytest.mark.parametrize("path", ["sorted", "gather"])
@pytest.mark.parametrize("activation,gate_up_bias,down_bias", BODIES, ids=BODY_IDS)
def test_body_matches_torch_fp16(activation, gate_up_bias, down_bias, path):
    feeds = _in_dtype(_case(11, 6, 2, 16, 12, gate_up_bias, down_bias, scale=3.0, seed=1), "fp16")
    try:
        session = _session(6, PATHS[path], activation, gate_up_bias, down_bias, "fp16")
    except Exception as exc:  # ORT CPU lacks some fp16 kernels on some builds
        pytest.skip(reason=f"ONNX Runtime CPU cannot run this fp16 graph here: {exc}")
    got = session.run(None, feeds)[0]
    assert got.dtype == np.float16
    # NOTE: fp16 matmuls and activations rounded at every op, in a different order than torch's
    tol = tolerance("fp16", "hidden")
    close = check_close(got, _torch(feeds, activation=activation), tol)
    assert close.ok, f"onnx fp16 vs torch fp16: {close}"
    close = check_close(got, _reference(feeds, activation=activation), tol)
    assert close.ok, f"onnx fp16 vs NumPy reference: {close}"


@pytest.mark.parametrize("path", ["sorted", "gather"])
def test_body_reads_alpha_and_limit_from_the_node(path):
    feeds = _case(9, 5, 2, 8, 6, True, True, scale=3.0, seed=7)
    attrs = (("alpha", 1.25), ("limit", 0.75))
    got = _session(5, PATHS[path], "clamped_swiglu", True, True, "fp32", attrs).run(None, feeds)[0]
    ref = _reference(feeds, activation="clamped_swiglu", **dict(attrs))
    close = check_close(got, ref, tolerance("fp32", "hidden"))
    assert close.ok, f"onnx vs NumPy reference: {close}"
    # the attributes matter: the defaults give another result on this data
    default = _reference(feeds, activation="clamped_swiglu")
    assert not check_close(got, default, tolerance("fp32", "hidden")).ok


@pytest.mark.parametrize("path", ["sorted", "gather"])
def test_clamped_body_without_clamp_is_silu_body_with_up_bias_plus_one(path):
    """limit huge and alpha 1: the clamped body equals the silu body with every up bias raised by one."""
    feeds = _case(10, 6, 2, 12, 8, True, True, seed=3)
    attrs = (("alpha", 1.0), ("limit", 1e30))
    clamped = _session(6, PATHS[path], "clamped_swiglu", True, True, "fp32", attrs).run(None, feeds)[0]
    plus_one = dict(feeds, b_gate_up=feeds["b_gate_up"].copy())
    plus_one["b_gate_up"][:, 8:] += 1.0
    silu = _session(6, PATHS[path], "silu", True, True, "fp32").run(None, plus_one)[0]
    close = check_close(clamped, silu, tolerance("fp32", "hidden"))
    assert close.ok, f"clamped (no clamp, alpha 1) vs silu with up bias + 1: {close}"


@pytest.mark.parametrize("activation,gate_up_bias,down_bias", BODIES, ids=BODY_IDS)
def test_body_has_no_string_constants_and_declares_its_inputs(activation, gate_up_bias, down_bias):
    function = onnx_function(OPSET, 4, activation=activation, gate_up_bias=gate_up_bias, down_bias=down_bias)

    def nodes(ns):
        for n in ns:
            yield n
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    yield from nodes(a.g.node)

    for node in nodes(function.node):
        for a in node.attribute:
            assert not (node.op_type == "Constant" and a.name in ("value_string", "value_strings")), node
            if node.op_type == "Constant" and a.name == "value":
                assert a.t.data_type != TensorProto.STRING, node
    want = ["x", "weights", "indices", "w_gate_up", "w_down"]
    if gate_up_bias or down_bias:
        want.append("b_gate_up")
    if down_bias:
        want.append("b_down")
    assert list(function.input) == want
    defaults = {a.name: helper.get_attribute_value(a) for a in function.attribute_proto}
    if activation in ("silu", "gelu_tanh"):  # no float attribute: alpha and limit are clamped_swiglu's
        assert defaults == {"activation": b"silu", "plugin_namespace": b"moetrt"}
    else:
        assert set(defaults) == {"activation", "alpha", "limit", "plugin_namespace"}
        assert defaults["alpha"] == pytest.approx(1.702) and defaults["limit"] == 7.0
        refs = {a.ref_attr_name for n in nodes(function.node) for a in n.attribute if a.ref_attr_name}
        assert refs == {"alpha", "limit"}


# --- Llama 4: the routing weight scales the experts' input (weight_input=1) ----------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("activation,gate_up_bias,down_bias", [("silu", False, False), ("silu", True, True),
                                                                ("gelu_tanh", False, False)], ids=["silu", "silu-b", "gelu"])
@pytest.mark.parametrize("tokens,experts,k,dim,ffn", SHAPES)
def test_weight_input_body_matches_reference_fp32(tokens, experts, k, dim, ffn, activation, gate_up_bias, down_bias,
                                                  path):
    feeds = _case(tokens, experts, k, dim, ffn, gate_up_bias, down_bias, scale=3.0, seed=tokens + experts + 1)
    attrs = (("weight_input", 1),)
    got = _session(experts, PATHS[path], activation, gate_up_bias, down_bias, "fp32", attrs).run(None, feeds)[0]
    ref = _reference(feeds, activation=activation, weight_input=1)
    assert got.shape == (tokens, dim) and got.dtype == np.float32
    for what, value in (("onnx", got), ("torch", _torch(feeds, activation=activation, weight_input=1))):
        close = check_close(value, ref, tolerance("fp32", "hidden"))
        assert close.ok, f"{what} vs NumPy reference: {close}"
    if tokens:  # the attribute matters: weighting the outputs gives another result on this data
        assert not check_close(got, _reference(feeds, activation=activation), tolerance("fp32", "hidden")).ok


@pytest.mark.parametrize("path", ["sorted", "gather"])
def test_weight_input_with_unit_weights_is_output_weighting(path):
    """Degenerate equivalence: with every routing weight 1, weighting the input or the output is the same op."""
    feeds = _case(10, 6, 2, 12, 8, True, True, seed=5)
    feeds["weights"] = np.ones_like(feeds["weights"])
    as_input = _session(6, PATHS[path], "silu", True, True, "fp32", (("weight_input", 1),)).run(None, feeds)[0]
    as_output = _session(6, PATHS[path], "silu", True, True, "fp32").run(None, feeds)[0]
    close = check_close(as_input, as_output, tolerance("fp32", "hidden"))
    assert close.ok, f"input weighting vs output weighting at weight 1: {close}"
    close = check_close(_torch(feeds, weight_input=1), _torch(feeds), tolerance("fp32", "hidden"))
    assert close.ok, f"torch op: input weighting vs output weighting at weight 1: {close}"
    close = check_close(_reference(feeds, weight_input=1), _reference(feeds), tolerance("fp32", "hidden"))
    assert close.ok, f"NumPy reference: input weighting vs output weighting at weight 1: {close}"
    function = onnx_function(OPSET, 6, weight_input=1)
    assert not any(n.op_type == "Constant" and any(a.name in ("value_string", "value_strings") for a in n.attribute)
                   for n in function.node)
    # the version-1 body is unchanged: it declares no weight_input default
    assert "weight_input" not in {a.name for a in onnx_function(OPSET, 6).attribute_proto}
