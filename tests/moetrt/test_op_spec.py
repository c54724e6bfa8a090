"""The op specs (``moetrt/ops/_spec.py``) and every face that derives from them.

Each op declares its inputs and attributes once; the ONNX schema, the function bodies' defaults,
the attributes an export writes, the checks, the torch op's schema and the Python signatures
must agree with it. These tests fail when a face drifts from its spec.
"""

from __future__ import annotations

import inspect
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
    # every TopKRouting attribute is on version-1 nodes
    assert TKR.non_default({"k": 2}) == {"k": 2, "scoring": "softmax", "normalize": 0, "scale": 1.0,
                                          "plugin_namespace": "moetrt"}


@pytest.mark.parametrize("spec,values,match", [
    (SMOE, {"activation": "gelu"}, r"'activation' must be one of \('silu', 'clamped_swiglu'\)"),
    (SMOE, {"alpha": "1.0"}, r"'alpha' must be float"),
    (SMOE, {"limit": True}, r"'limit' must be float"),
    (SMOE, {"beta": 1.0}, r"unknown attribute\(s\) \['beta'\]"),
    (SMOE, {"plugin_namespace": "other"}, r"'plugin_namespace' must be one of \('moetrt',\)"),
    (TKR, {}, r"'k' is required"),
    (TKR, {"k": 2, "normalize": 2}, r"'normalize' must be one of \(0, 1\)"),
    (TKR, {"k": 2, "scoring": "relu"}, r"'scoring' must be one of"),
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
    assert [p.name for p in schema.inputs] == spec.input_names
    optional = OpSchema.FormalParameterOption.Optional
    assert [p.option == optional for p in schema.inputs] == [p.optional for p in spec.inputs]
    assert [p.name for p in schema.outputs] == spec.output_names
    kinds = {int: OpSchema.AttrType.INT, float: OpSchema.AttrType.FLOAT, str: OpSchema.AttrType.STRING}
    assert set(schema.attributes) == {a.name for a in spec.attrs}
    for a in spec.attrs:
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
    fn = topk_routing_mod.onnx_function(20)
    assert list(fn.attribute) == [a.name for a in TKR.attrs if a.required]
    assert [a.name for a in fn.attribute_proto] == list(TKR.defaults)


# --- torch op and Python signatures ---------------------------------------------------------------
def _torch_args(op):
    return [(a.name, str(a.type), a.default_value if a.has_default_value() else inspect.Parameter.empty)
            for a in op.default._schema.arguments]


def _want_torch_args(spec, attrs, kinds):
    out = [(p.name, "Optional[Tensor]" if p.optional else "Tensor",
            None if p.optional else inspect.Parameter.empty) for p in spec.inputs]
    for name in attrs:
        a = spec.attr(name)
        out.append((name, kinds.get(name, a.kind.__name__), inspect.Parameter.empty if a.required else a.default))
    return out


def test_sparse_moe_torch_schema_is_the_spec():
    assert _torch_args(torch.ops.moetrt.SparseMoE) == _want_torch_args(SMOE, sparse_moe_mod.TORCH_ATTRS, {})
    assert str(torch.ops.moetrt.SparseMoE.default._schema) == "moetrt::SparseMoE" + SMOE.torch_schema(
        sparse_moe_mod.TORCH_ATTRS, "Tensor").replace("=7.0", "=7.")  # torch prints 7.0 as 7.


def test_topk_routing_torch_schema_is_the_spec():
    # normalize is an int 0/1 attribute in ONNX and a bool in torch; its default 0 == False
    assert _torch_args(torch.ops.moetrt.TopKRouting) == _want_torch_args(
        TKR, ("k", "scoring", "normalize", "scale"), {"normalize": "bool"})


@pytest.mark.parametrize("fn", [
    sparse_moe_mod.sparse_moe_eager, sparse_moe_mod.sparse_moe_reference, sparse_moe_mod._sparse_moe,
    _translation_table()[torch.ops.moetrt.SparseMoE.default],
], ids=["eager", "reference", "custom_op", "onnx translation"])
def test_sparse_moe_python_signatures_are_the_spec(fn):
    params = [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]
    want = [(name, default) for name, _, default in _want_torch_args(SMOE, sparse_moe_mod.TORCH_ATTRS, {})]
    assert params == want


@pytest.mark.parametrize("fn", [
    topk_routing_mod.topk_routing_reference, _translation_table()[torch.ops.moetrt.TopKRouting.default],
], ids=["reference", "onnx translation"])
def test_topk_routing_python_signatures_are_the_spec(fn):
    params = [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]
    want = [(name, default) for name, _, default in _want_torch_args(TKR, ("k", "scoring", "normalize", "scale"), {})]
    assert params == want
