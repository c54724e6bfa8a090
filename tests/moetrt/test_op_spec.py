"""The op specs (``moetrt/ops/_spec.py``) and every face that derives from them.

Each op declares its inputs and attributes once; the ONNX schema, the function bodies' defaults,
the attributes an export writes, the checks, the torch op's schema and the Python signatures
must agree with it. These tests fail when a face drifts from its spec.
"""

from __future__ import annotations

import inspect
import re
import sys


import pytest
import torch

import moetrt.ops  # noqa: F401  (registers the torch ops)
from moetrt.export.onnx_from_torch import _translation_table

sparse_moe_mod = sys.modules["moetrt.ops.sparse_moe"]
topk_routing_mod = sys.modules["moetrt.ops.topk_routing"]
SMOE, TKR = sparse_moe_mod.SPEC, topk_routing_mod.SPEC


# --- resolve / non_default / unsupported ----------------------------------------------------------
def test_non_default_keeps_version_1_attributes_and_only_changed_new_ones():
    base = {"plugin_namespace": "moetrt", "activation": "silu"}
    assert SMOE.non_default({"activation": "silu"}) == base
    assert SMOE.non_default({"activation": "clamped_swiglu"}) == {**base, "activation": "clamped_swiglu"}
    assert SMOE.non_default({"activation": "clamped_swiglu", "alpha": 1.702, "limit": 3}) == {
        "activation": "clamped_swiglu", "limit": 3.0, "plugin_namespace": "moetrt"}
    # alpha and limit do not apply to silu: never written there
    assert SMOE.non_default({"activation": "silu", "alpha": 2.0, "limit": 1.0}) == base
    # every version-1 TopKRouting attribute is on version-1 nodes; version-2 ones only where not default
    v1 = {"k": 2, "scoring": "softmax", "normalize": 0, "scale": 1.0, "plugin_namespace": "moetrt"}
    assert TKR.non_default({"k": 2}) == v1
    assert TKR.non_default({"k": 2, "n_group": 1, "topk_group": 1, "group_scoring": "top2_sum"}) == v1
    assert TKR.non_default({"k": 2, "n_group": 4, "topk_group": 2}) == {
        "k": 2, "scoring": "softmax", "normalize": 0, "scale": 1.0, "n_group": 4, "topk_group": 2,
        "plugin_namespace": "moetrt"}


def test_version_for_is_1_without_version_2_options():
    assert TKR.version_for({"k": 2}) == 1
    assert TKR.version_for({"k": 2, "n_group": 1, "topk_group": 1, "group_scoring": "top2_sum"}) == 1
    assert TKR.version_for({"k": 2}, ("logits",)) == 1
    assert TKR.version_for({"k": 2}, ("logits", "selection_bias")) == 2
    assert TKR.version_for({"k": 2, "n_group": 2}) == 2
    assert TKR.version_for({"k": 2, "group_scoring": "max"}) == 2
    assert SMOE.version_for({"activation": "clamped_swiglu"}, ("x", "b_down")) == 1


@pytest.mark.parametrize("spec,values,match", [
    (SMOE, {"activation": "gelu"}, r"'activation' must be one of \('silu', 'clamped_swiglu', 'gelu_tanh'\)"),
    (SMOE, {"alpha": "1.0"}, r"'alpha' must be float"),
    (SMOE, {"limit": True}, r"'limit' must be float"),
    (SMOE, {"beta": 1.0}, r"unknown attribute\(s\) \['beta'\]"),
    (SMOE, {"plugin_namespace": "other"}, r"'plugin_namespace' must be one of \('moetrt',\)"),
    (TKR, {}, r"'k' is required"),
    (TKR, {"k": 2, "normalize": 3}, r"'normalize' must be one of \(0, 1, 2\)"),
    (TKR, {"k": 2, "scoring": "relu"}, r"'scoring' must be one of"),
    (TKR, {"k": 2, "group_scoring": "mean"}, r"'group_scoring' must be one of \('top2_sum', 'max'\)"),
    (TKR, {"k": 2, "n_group": 2.0}, r"'n_group' must be int"),
])
def test_resolve_rejects_bad_values(spec, values, match):
    with pytest.raises(ValueError, match=match):
        spec.resolve(values)


def test_unsupported_rejects_by_default_and_skips_attributes_that_do_not_apply():
    silu_only = {"activation": ("silu",)}
    assert SMOE.unsupported({"activation": "silu"}, silu_only, "lowering X") is None
    assert SMOE.unsupported({"activation": "silu", "alpha": 3.0}, silu_only, "lowering X") is None
    reason = SMOE.unsupported({"activation": "clamped_swiglu"}, silu_only, "lowering X")
    assert reason == "lowering X implements activation in ('silu',), the node has activation='clamped_swiglu'"
    both = {"activation": sparse_moe_mod.ACTIVATIONS}
    assert SMOE.unsupported({"activation": "clamped_swiglu"}, both, "Y") is None
    reason = SMOE.unsupported({"activation": "clamped_swiglu", "limit": 2.0}, both, "Y")
    assert reason == "Y does not implement limit=2.0 (only the default 7.0)"
    assert TKR.unsupported({"k": 2, "scoring": "sigmoid"}, {"k": range(1, 9), "scoring": ("softmax",)}, "Z") == (
        "Z implements scoring in ('softmax',), the node has scoring='sigmoid'")
    assert TKR.unsupported({"k": 2, "n_group": 4, "topk_group": 2}, {"k": range(1, 9)}, "Z") == (
        "Z does not implement n_group=4 (only the default 1)")


def test_defaults_for_leaves_out_attributes_that_do_not_apply():
    assert SMOE.defaults_for({"activation": "silu"}) == {"activation": "silu", "plugin_namespace": "moetrt"}
    assert list(SMOE.defaults_for({"activation": "clamped_swiglu"})) == ["activation", "alpha", "limit",
                                                                         "plugin_namespace"]


# --- ONNX schema ----------------------------------------------------------------------------------
@pytest.mark.parametrize("module", [sparse_moe_mod, topk_routing_mod], ids=["SparseMoE", "TopKRouting"])
def test_onnx_schema_is_the_spec(module):
    from onnx import helper
    from onnx.defs import OpSchema

    spec, schema = module.SPEC, module.onnx_schema()
    assert (schema.name, schema.domain, schema.since_version) == (spec.name, spec.domain, spec.version)
    _assert_schema_is_the_spec(spec, schema, spec.version)


def test_topk_routing_version_1_schema_has_only_version_1_members():
    schemas = topk_routing_mod.onnx_schemas()
    assert [s.since_version for s in schemas] == [1, 2, 3, 4]
    v1 = schemas[0]
    assert [p.name for p in v1.inputs] == ["logits"]
    assert set(v1.attributes) == {"k", "scoring", "normalize", "scale", "plugin_namespace"}
    _assert_schema_is_the_spec(TKR, v1, 1)
    assert "norm_min" not in schemas[1].attributes and "norm_min" in schemas[2].attributes  # version 3 adds it
    _assert_schema_is_the_spec(TKR, schemas[1], 2)
    _assert_schema_is_the_spec(TKR, schemas[2], 3)
    # version 4 (sparsemixer) adds jitter_eps and nothing else
    assert set(schemas[3].attributes) - set(schemas[2].attributes) == {"jitter_eps"}
    _assert_schema_is_the_spec(TKR, schemas[3], 4)
    with pytest.raises(ValueError, match=r"version must be in 1..4, got 5"):
        TKR.onnx_schema(5)


def _assert_schema_is_the_spec(spec, schema, version):
    from onnx import helper
    from onnx.defs import OpSchema

    inputs = [p for p in spec.inputs if p.since <= version]
    attrs = [a for a in spec.attrs if a.since <= version]
    assert [p.name for p in schema.inputs] == [p.name for p in inputs]
    optional = OpSchema.FormalParameterOption.Optional
    assert [p.option == optional for p in schema.inputs] == [p.optional for p in inputs]
    assert [p.name for p in schema.outputs] == spec.output_names
    kinds = {int: OpSchema.AttrType.INT, float: OpSchema.AttrType.FLOAT, str: OpSchema.AttrType.STRING}
    assert set(schema.attributes) == {a.name for a in attrs}
    for a in attrs:
        got = schema.attributes[a.name]
        assert got.type == kinds[a.kind] and got.required == a.required, a.name
        if a.always:  # the exporter writes these defaults onto every node
            assert helper.get_attribute_value(got.default_value) == (
                a.default.encode() if a.kind is str else a.default), a.name
        elif not a.required:  # defaults live in the function body, so the exporter leaves them off
            assert not got.default_value.name, a.name


@pytest.mark.parametrize("activation,gate_up_bias,down_bias", [("silu", False, False), ("clamped_swiglu", True, True)])
def test_function_bodies_take_their_defaults_from_the_spec(activation, gate_up_bias, down_bias):
    from onnx import helper

    fn = sparse_moe_mod.onnx_function(20, 3, activation=activation, gate_up_bias=gate_up_bias, down_bias=down_bias)
    got = {a.name: helper.get_attribute_value(a) for a in fn.attribute_proto}
    want = SMOE.defaults_for({"activation": activation})
    assert list(got) == list(want)
    for name, value in want.items():
        assert got[name] == (value.encode() if isinstance(value, str) else pytest.approx(value)), name
    fn = topk_routing_mod.onnx_function(20)  # the version-1 body declares the version-1 defaults only
    assert list(fn.attribute) == [a.name for a in TKR.attrs if a.required]
    assert [a.name for a in fn.attribute_proto] == [a.name for a in TKR.attrs if not a.required and a.since == 1]
    assert list(fn.input) == ["logits"]
    fn = topk_routing_mod.onnx_function(20, topk_routing_mod.RoutingVariant(True, 4, "max"))
    assert [a.name for a in fn.attribute_proto] == [a.name for a in TKR.attrs if not a.required and a.since <= 2]
    assert list(fn.input) == TKR.input_names
    fn = topk_routing_mod.onnx_function(20, topk_routing_mod.RoutingVariant(True, 4, "max", norm_min=True))
    assert [a.name for a in fn.attribute_proto] == [a.name for a in TKR.attrs if not a.required and a.since <= 3]
    fn = topk_routing_mod.onnx_function(20, topk_routing_mod.RoutingVariant(scoring="sparsemixer"))  # version 4
    assert [a.name for a in fn.attribute_proto] == list(TKR.defaults)
    assert list(fn.input) == ["logits"]


# --- torch op and Python signatures ---------------------------------------------------------------
def _torch_args(op):
    return [(a.name, str(a.type), a.default_value if a.has_default_value() else inspect.Parameter.empty)
            for a in op.default._schema.arguments]


def _want_torch_args(spec, attrs, kinds):
    """Inputs first unless ``attrs`` places them (TopKRouting's selection_bias after the version-1 attributes)."""
    def tensor(p):
        return (p.name, "Optional[Tensor]" if p.optional else "Tensor", None if p.optional else inspect.Parameter.empty)

    inputs = {p.name: p for p in spec.inputs}
    out = [tensor(p) for p in spec.inputs if p.name not in attrs]
    for name in attrs:
        if name in inputs:
            out.append(tensor(inputs[name]))
            continue
        a = spec.attr(name)
        out.append((name, kinds.get(name, a.kind.__name__), inspect.Parameter.empty if a.required else a.default))
    return out


def test_sparse_moe_torch_schema_is_the_spec():
    assert _torch_args(torch.ops.moetrt.SparseMoE) == _want_torch_args(SMOE, sparse_moe_mod.TORCH_ATTRS, {})
    assert str(torch.ops.moetrt.SparseMoE.default._schema) == "moetrt::SparseMoE" + SMOE.torch_schema(
        sparse_moe_mod.TORCH_ATTRS, "Tensor").replace("=7.0", "=7.")  # torch prints 7.0 as 7.


def test_topk_routing_torch_schema_is_the_spec():
    # normalize is an int 0/1/2 attribute in ONNX and in torch (callers' True/False are 1/0)
    args = topk_routing_mod.TORCH_ARGS
    assert args[:4] == ("k", "scoring", "normalize", "scale")  # existing callers pass these by position
    assert _torch_args(torch.ops.moetrt.TopKRouting) == _want_torch_args(TKR, args, {})
    want = TKR.torch_schema(args, "(Tensor, Tensor)", {})
    assert str(torch.ops.moetrt.TopKRouting.default._schema) == "moetrt::TopKRouting" + re.sub(
        r"=(\d+)\.0\b", r"=\1.", want)  # torch prints 1.0 as 1. (and 0.0 as 0.; 0.01 stays)


@pytest.mark.parametrize("fn", [
    sparse_moe_mod.sparse_moe_eager, sparse_moe_mod.sparse_moe_reference, sparse_moe_mod._sparse_moe,
    _translation_table()[torch.ops.moetrt.SparseMoE.default],
], ids=["eager", "reference", "custom_op", "onnx translation"])
def test_sparse_moe_python_signatures_are_the_spec(fn):
    params = [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]
    want = [(name, default) for name, _, default in _want_torch_args(SMOE, sparse_moe_mod.TORCH_ATTRS, {})]
    assert params == want


@pytest.mark.parametrize("fn", [
    topk_routing_mod.topk_routing_reference, topk_routing_mod._topk_routing,
    _translation_table()[torch.ops.moetrt.TopKRouting.default],
], ids=["reference", "custom_op", "onnx translation"])
def test_topk_routing_python_signatures_are_the_spec(fn):
    params = [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]
    want = [(name, default) for name, _, default in _want_torch_args(TKR, topk_routing_mod.TORCH_ARGS, {})]
    assert params == want
