"""The ONNX TensorRT's parser builds from: what the canonical export carries, and the trt-target pass.

Checked on the CPU, without TensorRT: the moetrt nodes carry ``plugin_namespace`` and every
attribute their plugins declare, int32-safe; no ScatterND/ScatterElements with ``reduction``
anywhere (graph, function bodies, If branches); unique node names; no mixed float inputs to ops a
strongly typed network needs in one type; and the rewrite that ``plugins="aot"`` makes (SparseMoE
as four single-kernel plugins) keeps the graph's interface, with attributes that match the weights.
"""

from __future__ import annotations

from collections import Counter

import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import moetrt
from moetrt.errors import MoetrtError
from moetrt.ops.plugins import PLUGIN_ATTRIBUTES, PLUGIN_NAMESPACE
from moetrt.ops.plugins.aot import SPARSE_MOE_PLUGINS
from moetrt.optimize.trt import prepare_for_tensorrt, tensorrt_problems
from moetrt.optimize.trt.prepare import INT32_RANGE, SAME_TYPE_OPS

# small random models: (name, config overrides); E=1 and k=E are the degenerate ends
CONFIGS = {
    "mixtral_like": dict(num_experts=4, num_experts_per_tok=2),
    "sigmoid_k1": dict(num_experts=3, num_experts_per_tok=1, scoring="sigmoid", routed_scaling_factor=2.5),
    "k_equals_e": dict(num_experts=2, num_experts_per_tok=2, normalize_topk=False),
}
DTYPES = ("fp32", "fp16", "bf16")
# (config, export dtype): every dtype once, every config once (each export costs a few seconds)
CASES = [("mixtral_like", "fp32"), ("mixtral_like", "fp16"), ("mixtral_like", "bf16"), ("sigmoid_k1", "fp32"),
         ("k_equals_e", "fp16")]
FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def _config(**overrides) -> moetrt.MoEConfig:
    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                num_experts=4, num_experts_per_tok=2, intermediate_size=24, max_position_embeddings=128)
    return moetrt.MoEConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def export(canonical):
    def get(name: str = "mixtral_like", dtype: str = "fp32"):
        model, folder = canonical(_config(**CONFIGS[name]), dtype=dtype)
        return model, folder, ir.load(folder / "model.onnx")

    return get


def _every_node(model: ir.Model):
    """(where, node) over the main graph, subgraphs and function bodies, walked here independently of the pass."""
    def walk(graph, where):
        for node in graph:
            yield where, node
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    yield from walk(attr.value, f"{where}/{node.op_type}")
                elif attr.type == ir.AttributeType.GRAPHS:
                    for sub in attr.value:
                        yield from walk(sub, f"{where}/{node.op_type}")

    yield from walk(model.graph, "graph")
    for function in model.functions.values():
        yield from walk(function, f"function {function.name}")


# --- the canonical export ----------------------------------------------------------------------
@pytest.mark.parametrize("name,dtype", CASES)
def test_canonical_export_carries_what_the_parser_needs(export, name, dtype):
    model, _, graph = export(name, dtype)
    cfg = model.config
    moe = [n for n in graph.graph if n.domain == "moetrt"]
    assert Counter(n.op_type for n in moe) == {"TopKRouting": len(cfg.moe_layers), "SparseMoE": len(cfg.moe_layers)}
    for node in moe:
        assert node.attributes["plugin_namespace"].as_string() == PLUGIN_NAMESPACE
        for attr_name in PLUGIN_ATTRIBUTES[node.op_type]:
            if node.op_type == "SparseMoE" and attr_name not in node.attributes:
                continue  # defaults are left off the export; prepare_for_tensorrt writes them for the parser
            attr = node.attributes[attr_name]  # present: the parser hands plugins no defaults
            if attr.type == ir.AttributeType.INT:
                assert INT32_RANGE[0] <= attr.as_int() <= INT32_RANGE[1]
        if node.op_type == "TopKRouting":
            assert node.attributes["k"].as_int() == cfg.num_experts_per_tok
            assert node.outputs[1].dtype == ir.DataType.INT32 and node.outputs[0].dtype == ir.DataType.FLOAT
    names = [n.name for n in graph.graph]
    assert all(names) and len(set(names)) == len(names)
    assert tensorrt_problems(graph) == []


def test_no_scatter_with_reduction_anywhere(export):
    """ScatterND with ``reduction`` is rejected by TensorRT's parser, which may fall back to a body; so are
    string Constants; and TensorRT cannot build an If branch with data-dependent shapes, so the bodies have none."""
    _, _, graph = export()
    walked = list(_every_node(graph))
    assert any(where.startswith("function") for where, _ in walked)
    for where, node in walked:
        if node.op_type in ("ScatterND", "ScatterElements"):
            reduction = node.attributes.get("reduction")
            assert reduction is None or reduction.as_string() == "none", f"{where}: {node.op_type} reduction"
        if where.startswith("function"):
            assert node.op_type != "If", f"{where}: an If in a function body"
            assert not (node.op_type == "Constant" and any(
                a.type in (ir.AttributeType.STRING, ir.AttributeType.STRINGS) for a in node.attributes.values())), where


def test_string_constants_are_caught():
    routing = ir.Node("", "Constant", [], [ir.AttrString("value_string", "sigmoid")], num_outputs=1, name="c")
    graph = ir.Graph([], routing.outputs, nodes=[routing], opset_imports={"": 20})
    problems = tensorrt_problems(ir.Model(graph, ir_version=10))
    assert len(problems) == 1 and "string Constant" in problems[0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_strongly_typed_casts_are_explicit(export, dtype):
    """A strongly typed network needs one float type per elementwise op; only SparseMoE mixes (fp32 routing weights)."""
    _, _, graph = export("mixtral_like", dtype)
    for node in graph.graph:
        if node.domain != "" or node.op_type not in {**SAME_TYPE_OPS, "Pow": None}:
            continue
        floats = {v.dtype for v in node.inputs if v is not None and v.dtype in FLOATS}
        assert len(floats) <= 1, f"{node.op_type} {node.name} mixes {floats}"
        for value in node.inputs:
            assert value is None or value.dtype is not None, f"{node.name}: untyped input {value.name}"
    if dtype != "fp32":
        kv_dtype = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}[dtype]
        assert graph.graph.inputs[3].dtype == kv_dtype and graph.graph.outputs[0].dtype == ir.DataType.FLOAT


# --- the pass ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,dtype", CASES)
def test_aot_splits_sparse_moe_into_single_kernel_plugins(export, tmp_path, name, dtype):
    model, _, graph = export(name, dtype)
    cfg = model.config
    interface = ([(v.name, v.dtype) for v in graph.graph.inputs], [(v.name, v.dtype) for v in graph.graph.outputs])
    weights = {v.name: v.const_value.shape for v in graph.graph.initializers.values()}
    result = prepare_for_tensorrt(graph, "aot", num_tokens=8)

    layers = len(cfg.moe_layers)
    counts = Counter(n.op_type for n in graph.graph if n.domain == "moetrt")
    assert counts == {"TopKRouting": layers, **{p: layers for p in SPARSE_MOE_PLUGINS}}
    assert result.count == 2 * layers and result.details["sparse_moe_split"] == layers
    assert ([(v.name, v.dtype) for v in graph.graph.inputs], [(v.name, v.dtype) for v in graph.graph.outputs]) == interface
    for node in graph.graph:
        if node.domain != "moetrt":
            continue
        # registration order first (what the AOT impl receives positionally), then the parser's own two
        assert list(node.attributes) == [*PLUGIN_ATTRIBUTES[node.op_type], "plugin_namespace", "aot"]
        assert node.attributes["aot"].as_int() == 1
        attrs = {k: a.value for k, a in node.attributes.items()}
        if node.op_type in ("MoEGateUp", "MoEDown"):
            e, rows, cols = weights[node.inputs[1].name]
            f = rows // 2 if node.op_type == "MoEGateUp" else cols
            assert (attrs["num_experts"], attrs["ffn"], attrs["hidden_size"]) == (e, f, cfg.hidden_size)
            assert attrs["k"] == cfg.num_experts_per_tok
        if node.op_type == "MoEAlign":
            assert node.inputs[0].producer().op_type == "TopKRouting" and len(node.outputs) == 3
            assert all(o.dtype == ir.DataType.INT32 for o in node.outputs)
        if node.op_type == "MoEDown":  # routing weights come straight from the router, fp32 (after the bias input)
            assert node.inputs[3].producer().op_type == "TopKRouting" and node.inputs[3].dtype == ir.DataType.FLOAT
        if node.op_type in ("MoEGateUp", "MoEDown"):  # no bias in these models: a one-element placeholder, unread
            assert node.inputs[2].const_value.shape == (1,) and attrs[f"has_{node.inputs[2].name.split('/no_')[1]}"] == 0
    assert tensorrt_problems(graph, "aot") == []
    ir.save(graph, tmp_path / "model.onnx")
    onnx.checker.check_model(str(tmp_path / "model.onnx"))  # a valid model (custom ops have no schema to check)


def test_jit_keeps_sparse_moe(export):
    model, _, graph = export()
    prepare_for_tensorrt(graph, "jit")
    moe = [n for n in graph.graph if n.domain == "moetrt"]
    assert Counter(n.op_type for n in moe) == {"TopKRouting": 2, "SparseMoE": 2}
    assert all(n.attributes["aot"].as_int() == 0 for n in moe)
    assert tensorrt_problems(graph, "jit") == []
    problems = tensorrt_problems(graph, "aot")  # the same graph is not ready for an AOT build
    assert any("needs aot=1" in p for p in problems) and any("has no AOT implementation" in p for p in problems)


@pytest.mark.parametrize("num_tokens,block_m", [(1, 16), (1024, 128)])
def test_block_sizes_follow_the_profile(export, num_tokens, block_m):
    """The engine keeps one SparseMoE config, chosen for the profile's optimal token count."""
    _, _, graph = export()
    prepare_for_tensorrt(graph, "aot", num_tokens=num_tokens)
    aligns = [n for n in graph.graph if n.op_type == "MoEAlign"]
    assert {n.attributes["block_m"].as_int() for n in aligns} == {block_m}


def test_precision_converted_graph_is_ready(export):
    from moetrt.optimize.precision import convert_precision

    _, _, graph = export()
    convert_precision(graph, "fp16")
    prepare_for_tensorrt(graph, "aot")
    assert tensorrt_problems(graph, "aot") == []


# --- what the checks catch ---------------------------------------------------------------------
def _tiny_graph(nodes, inputs, outputs, functions=(), initializers=()):
    proto = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, list(initializers)),
        opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("moetrt", 1)], functions=list(functions),
    )
    return ir.serde.deserialize_model(proto)


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def test_reduction_inside_a_function_branch_is_caught():
    then = helper.make_graph([helper.make_node("ScatterND", ["d", "i", "u"], ["o"], reduction="add")], "then", [],
                             [_vi("o", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["d"], ["o2"])], "else", [], [_vi("o2", TensorProto.FLOAT, None)])
    body = [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
    fn = helper.make_function("moetrt", "Body", ["c", "d", "i", "u"], ["y"], body, [helper.make_opsetid("", 20)])
    node = helper.make_node("Body", ["c", "d", "i", "u"], ["y"], domain="moetrt", name="body")
    graph = _tiny_graph([node], [_vi("c", TensorProto.BOOL, []), _vi("d", TensorProto.FLOAT, [4]),
                                 _vi("i", TensorProto.INT64, [1, 1]), _vi("u", TensorProto.FLOAT, [1])],
                        [_vi("y", TensorProto.FLOAT, [4])], functions=[fn])
    problems = tensorrt_problems(graph)
    assert any("ScatterND" in p and "reduction='add'" in p and "function moetrt::Body" in p for p in problems), problems


def test_mixed_types_contrib_ops_and_attributes_are_caught():
    nodes = [
        helper.make_node("Add", ["a16", "b32"], ["s"], name="add"),
        helper.make_node("MoE", ["s"], ["m"], domain="com.microsoft", name="moe"),
        helper.make_node("TopKRouting", ["b32"], ["w", "ix"], domain="moetrt", name="router", k=2**31, scoring="softmax",
                         normalize=1, scale=1.0),
        helper.make_node("Relu", ["b32"], ["r"]),
    ]
    graph = _tiny_graph(nodes, [_vi("a16", TensorProto.FLOAT16, [2, 4]), _vi("b32", TensorProto.FLOAT, [2, 4])],
                        [_vi("m", TensorProto.FLOAT16, None), _vi("w", TensorProto.FLOAT, None), _vi("r", TensorProto.FLOAT, None)])
    text = "\n".join(tensorrt_problems(graph))
    assert "mixes float inputs ['FLOAT', 'FLOAT16']" in text
    assert "domain 'com.microsoft'" in text
    assert "plugin_namespace" in text and "does not fit int32" in text
    assert "a Relu node has no name" in text
    with pytest.raises(MoetrtError, match="cannot be built with TensorRT"):
        prepare_for_tensorrt(graph, "jit")


def test_pow_exponent_gets_a_cast_and_nodes_get_names():
    exponent = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    nodes = [helper.make_node("Pow", ["x", "two"], ["y"]), helper.make_node("Identity", ["y"], ["z"]),
             helper.make_node("Identity", ["z"], ["out"], name="dup"), helper.make_node("Identity", ["x"], ["o2"], name="dup")]
    graph = _tiny_graph(nodes, [_vi("x", TensorProto.FLOAT16, [3])],
                        [_vi("out", TensorProto.FLOAT16, [3]), _vi("o2", TensorProto.FLOAT16, [3])], initializers=[exponent])
    assert any("no name" in p for p in tensorrt_problems(graph))
    result = prepare_for_tensorrt(graph, "aot")
    assert result.details["pow_casts"] == 1 and result.details["named_nodes"] == 3
    pow_node = next(n for n in graph.graph if n.op_type == "Pow")
    assert {v.dtype for v in pow_node.inputs} == {ir.DataType.FLOAT16}
    assert pow_node.inputs[1].producer().op_type == "Cast"
    names = [n.name for n in graph.graph]
    assert all(names) and len(set(names)) == len(names)
    assert tensorrt_problems(graph, "aot") == []


def test_unknown_plugin_mode_and_missing_attribute():
    graph = _tiny_graph([helper.make_node("SparseMoE", ["x", "w", "i", "a", "b"], ["y"], domain="moetrt", name="moe",
                                          plugin_namespace="moetrt")],
                        [_vi(n, TensorProto.FLOAT, [2, 2]) for n in "xwiab"], [_vi("y", TensorProto.FLOAT, [2, 2])])
    with pytest.raises(MoetrtError, match="plugins must be one of aot, jit"):
        prepare_for_tensorrt(graph, "python")
    graph.graph.node(0).attributes["activation"] = ir.AttrString("activation", "gelu")
    with pytest.raises(MoetrtError, match=r"SparseMoE node 'moe': .*activation"):
        prepare_for_tensorrt(graph, "jit")


@pytest.mark.parametrize("inputs,attrs,match", [
    (["l", "b"], {}, r"the TopKRouting plugin does not implement the selection_bias input.*version 2"),
    (["l"], {"n_group": 2, "topk_group": 1}, r"the TopKRouting plugin does not implement n_group=2.*version 2"),
    (["l"], {"group_scoring": "max"}, r"the TopKRouting plugin does not implement group_scoring='max'.*version 2"),
    (["l"], {"norm_min": 0.4}, r"the TopKRouting plugin does not implement norm_min=0.4.*version 3"),
], ids=["selection_bias", "groups", "group_scoring", "norm_min"])
@pytest.mark.parametrize("plugins", ["aot", "jit"])
def test_version_2_routing_is_refused_with_a_reason(inputs, attrs, match, plugins):
    node = helper.make_node("TopKRouting", inputs, ["w", "i"], domain="moetrt", name="router", k=2, scoring="sigmoid",
                            normalize=1, scale=1.0, plugin_namespace="moetrt", **attrs)
    graph = _tiny_graph([node], [_vi("l", TensorProto.FLOAT, [3, 4]), _vi("b", TensorProto.FLOAT, [4])],
                        [_vi("w", TensorProto.FLOAT, [3, 2]), _vi("i", TensorProto.INT32, [3, 2])])
    with pytest.raises(MoetrtError, match=r"TopKRouting node 'router': " + match + r".*ONNX Runtime"):
        prepare_for_tensorrt(graph, plugins)
    # the version-1 node of the same attributes is prepared
    plain = helper.make_node("TopKRouting", ["l"], ["w", "i"], domain="moetrt", name="router", k=2, scoring="sigmoid",
                             normalize=1, scale=1.0, plugin_namespace="moetrt")
    graph = _tiny_graph([plain], [_vi("l", TensorProto.FLOAT, [3, 4])],
                        [_vi("w", TensorProto.FLOAT, [3, 2]), _vi("i", TensorProto.INT32, [3, 2])])
    assert prepare_for_tensorrt(graph, plugins).count == 1


# --- gpt-oss: clamped SwiGLU, expert and router biases ------------------------------------------
@pytest.fixture(scope="module")
def gpt_oss(canonical):
    def get():
        model, folder = canonical("gpt_oss")  # tests/hf_tiny.py: 3 layers, E=6, k=2, D=64, F=32
        return model, ir.load(folder / "model.onnx")

    return get


def _clamped_swiglu(attrs: dict, cfg) -> bool:
    return (attrs["activation"] == "clamped_swiglu" and abs(attrs["alpha"] - cfg.swiglu_alpha) < 1e-6
            and abs(attrs["limit"] - cfg.swiglu_limit) < 1e-6)


def test_gpt_oss_jit_keeps_sparse_moe_with_its_biases(gpt_oss):
    model, graph = gpt_oss()
    cfg = model.config
    assert tensorrt_problems(graph, "jit"), "the export alone lacks the attributes the parser needs"
    result = prepare_for_tensorrt(graph, "jit")
    layers = len(cfg.moe_layers)
    assert result.count == 2 * layers and not result.skipped
    moe = [n for n in graph.graph if n.op_type == "SparseMoE"]
    assert Counter(n.op_type for n in graph.graph if n.domain == "moetrt") == {"TopKRouting": layers,
                                                                               "SparseMoE": layers}
    E, D, F = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    for node in moe:
        attrs = {k: a.value for k, a in node.attributes.items()}
        assert list(attrs) == [*PLUGIN_ATTRIBUTES["SparseMoE"], "plugin_namespace", "aot"]
        assert _clamped_swiglu(attrs, cfg) and attrs["has_b_gate_up"] == 1 and attrs["has_b_down"] == 1
        b_gate_up, b_down = node.inputs[5:7]
        assert b_gate_up.name.endswith("gate_up_proj_bias") and tuple(b_gate_up.shape) == (E, 2 * F)
        assert b_down.name.endswith("down_proj_bias") and tuple(b_down.shape) == (E, D)
        router = node.inputs[1].producer().inputs[0].producer()  # TopKRouting <- the router's Gemm
        assert router.op_type == "Gemm" and len(router.inputs) == 3, "the router keeps its bias"
    assert tensorrt_problems(graph, "jit") == []


@pytest.mark.parametrize("precision", [None, "fp16"])
def test_gpt_oss_aot_decomposition_carries_activation_and_biases(gpt_oss, tmp_path, precision):
    from moetrt.optimize.precision import convert_precision

    model, graph = gpt_oss()
    cfg = model.config
    if precision:
        convert_precision(graph, precision)
    interface = [(v.name, v.dtype) for v in (*graph.graph.inputs, *graph.graph.outputs)]
    result = prepare_for_tensorrt(graph, "aot", num_tokens=8)
    layers = len(cfg.moe_layers)
    assert result.details["sparse_moe_split"] == layers and not result.skipped
    counts = Counter(n.op_type for n in graph.graph if n.domain == "moetrt")
    assert counts == {"TopKRouting": layers, **{p: layers for p in SPARSE_MOE_PLUGINS}}
    assert [(v.name, v.dtype) for v in (*graph.graph.inputs, *graph.graph.outputs)] == interface
    E, D, F = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    for node in graph.graph:
        attrs = {k: a.value for k, a in node.attributes.items()}
        if node.op_type == "MoEGateUp":  # the activation runs in the gate/up kernel, on the biased gate and up
            assert _clamped_swiglu(attrs, cfg) and attrs["has_b_gate_up"] == 1
            assert tuple(node.inputs[1].shape) == (E, 2 * F, D) and tuple(node.inputs[2].shape) == (E, 2 * F)
            assert node.inputs[2].name.endswith("gate_up_proj_bias")
        if node.op_type == "MoEDown":
            assert attrs["has_b_down"] == 1 and tuple(node.inputs[2].shape) == (E, D)
            assert node.inputs[2].name.endswith("down_proj_bias")
            assert node.inputs[3].producer().op_type == "TopKRouting" and node.inputs[3].dtype == ir.DataType.FLOAT
        if node.op_type in ("MoEGateUp", "MoEDown"):
            assert (attrs["num_experts"], attrs["hidden_size"], attrs["ffn"], attrs["k"]) == (
                E, D, F, cfg.num_experts_per_tok)
            assert node.inputs[2].dtype == node.inputs[0].dtype, "biases in the activation dtype"
    assert tensorrt_problems(graph, "aot") == []
    ir.save(graph, tmp_path / "model.onnx")
    onnx.checker.check_model(str(tmp_path / "model.onnx"))
