"""The export of ``moetrt::SparseMoE`` nodes with gpt-oss's options: bias inputs and the clamped activation.

A node carries its bias inputs where the model has them (an empty name for a missing b_gate_up
before a present b_down) and only the attributes ``SPEC.non_default`` names; the attached body is
specialised for the model's variant, and a model whose layers need different bodies gets one
overload per variant. Each export runs in ONNX Runtime against the torch model.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest
import torch
from torch import nn

from moetrt.export.onnx_from_torch import DEFAULT_OPSET, attach_functions, trace_to_onnx
from moetrt.ops import sparse_moe, topk_routing
from moetrt.parity import check_close, tolerance

ort = pytest.importorskip("onnxruntime")

E, D, F, K = 5, 12, 8, 2


class _Layer(nn.Module):
    """Router + routed experts of one layer; ``options``: SparseMoE's keyword arguments."""

    def __init__(self, gate_up_bias: bool, down_bias: bool, seed: int, **options):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.gate = nn.Parameter(torch.randn(E, D, generator=g))
        self.w_gate_up = nn.Parameter(torch.randn(E, 2 * F, D, generator=g) * 0.3)
        self.w_down = nn.Parameter(torch.randn(E, D, F, generator=g) * 0.3)
        self.b_gate_up = nn.Parameter(torch.randn(E, 2 * F, generator=g) * 0.5) if gate_up_bias else None
        self.b_down = nn.Parameter(torch.randn(E, D, generator=g) * 0.5) if down_bias else None
        self.options = options

    def forward(self, x):  # [T, D] -> [T, D]
        weights, indices = topk_routing(x @ self.gate.T, K, "softmax", True, 1.0)
        return x + sparse_moe(x, weights, indices, self.w_gate_up, self.w_down, self.b_gate_up, self.b_down,
                              **self.options)


def _export(module: nn.Module, tmp_path):
    module.eval()
    model = trace_to_onnx(module, (torch.randn(7, D),), ({0: torch.export.Dim.DYNAMIC},), ["x"], ["y"], DEFAULT_OPSET)
    counts = attach_functions(model, E)
    path = tmp_path / "model.onnx"
    ir.save(model, path)
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    return proto, counts


def _experts_nodes(proto):
    return [n for n in proto.graph.node if n.domain == "moetrt" and n.op_type == "SparseMoE"]


def _attrs(node):
    return [(a.name, onnx.helper.get_attribute_value(a)) for a in node.attribute]


def _run_and_compare(proto, module, tokens=(1, 2, 9)):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for t in tokens:  # T*K below E takes the gather path, above it the sorted path
        x = torch.randn(t, D, generator=torch.Generator().manual_seed(t))
        with torch.no_grad():
            want = module(x).numpy()
        got = session.run(None, {"x": x.numpy()})[0]
        close = check_close(got, want, tolerance("fp32", "hidden"))
        assert close.ok, f"T={t}: onnx vs torch: {close}"


def test_silu_node_carries_the_version_1_attributes_only(tmp_path):
    proto, counts = _export(_Layer(False, False, seed=0), tmp_path)
    assert counts == {"TopKRouting": 1, "SparseMoE": 1}
    (node,) = _experts_nodes(proto)
    assert len(node.input) == 5 and node.overload == ""
    assert _attrs(node) == [("plugin_namespace", b"moetrt"), ("activation", b"silu")]
    (function,) = [f for f in proto.functions if f.name == "SparseMoE"]
    assert list(function.input) == ["x", "weights", "indices", "w_gate_up", "w_down"] and function.overload == ""


@pytest.mark.parametrize("gate_up_bias,down_bias", [(True, True), (True, False), (False, True), (False, False)])
def test_clamped_swiglu_with_biases_exports_and_runs(tmp_path, gate_up_bias, down_bias):
    module = _Layer(gate_up_bias, down_bias, seed=1, activation="clamped_swiglu")
    proto, _ = _export(module, tmp_path)
    (node,) = _experts_nodes(proto)
    names = list(node.input)
    assert len(names) == 5 + (2 if down_bias else int(gate_up_bias))
    if down_bias and not gate_up_bias:
        assert names[5] == "", "a missing b_gate_up before b_down is an empty input"
    # alpha and limit at their defaults stay off the node
    assert dict(_attrs(node)) == {"plugin_namespace": b"moetrt", "activation": b"clamped_swiglu"}
    (function,) = [f for f in proto.functions if f.name == "SparseMoE"]
    assert function.overload == "" and node.overload == ""
    assert len(function.input) == len(names)
    _run_and_compare(proto, module)


def test_non_default_alpha_and_limit_are_written_and_honoured(tmp_path):
    module = _Layer(True, True, seed=2, activation="clamped_swiglu", alpha=1.25, limit=0.5)
    proto, _ = _export(module, tmp_path)
    (node,) = _experts_nodes(proto)
    attrs = dict(_attrs(node))
    assert attrs["alpha"] == pytest.approx(1.25) and attrs["limit"] == pytest.approx(0.5)
    _run_and_compare(proto, module)


def test_silu_ignores_clamp_options(tmp_path):
    """alpha and limit apply only to the clamped activation: a silu node never carries them."""
    proto, _ = _export(_Layer(False, False, seed=3, activation="silu", alpha=2.0, limit=1.0), tmp_path)
    (node,) = _experts_nodes(proto)
    assert _attrs(node) == [("plugin_namespace", b"moetrt"), ("activation", b"silu")]


def test_layers_needing_different_bodies_get_one_overload_each(tmp_path):
    layers = nn.Sequential(
        _Layer(False, False, seed=4),
        _Layer(True, True, seed=5, activation="clamped_swiglu"),
        _Layer(False, True, seed=6, activation="clamped_swiglu", limit=2.0),
        _Layer(True, True, seed=7, activation="clamped_swiglu", alpha=1.5),  # same body as layer 1
    )
    proto, counts = _export(layers, tmp_path)
    assert counts == {"TopKRouting": 4, "SparseMoE": 4}
    assert proto.ir_version >= 10
    overloads = [n.overload for n in _experts_nodes(proto)]
    assert overloads == ["", "clamped_swiglu+b_gate_up+b_down", "clamped_swiglu+b_down", "clamped_swiglu+b_gate_up+b_down"]
    functions = {f.overload: f for f in proto.functions if f.name == "SparseMoE"}
    assert set(functions) == set(overloads)
    _run_and_compare(proto, layers)
