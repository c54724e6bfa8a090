"""``parity --backend trt`` builds its engine from the ONNX that ``optimize --target trt`` builds from:
the same :func:`moetrt.optimize.trt.prepare_for_tensorrt` pass, checked here without TensorRT."""

from __future__ import annotations

import sys
import types

import onnx_ir as ir
import pytest

from moetrt.ops.plugins.aot import SPARSE_MOE_PLUGINS
from moetrt.optimize.trt import prepare_for_tensorrt
from moetrt.parity import runners


def _graph_signature(model: ir.Model) -> list[tuple]:
    def value(a):  # a float attribute saved to a file comes back as float32
        return round(a.value, 6) if isinstance(a.value, float) else str(a.value)

    return [(n.domain, n.op_type, n.name, tuple(sorted((k, value(a)) for k, a in n.attributes.items())))
            for n in model.graph]


@pytest.mark.parametrize("plugins", ["aot", "jit", "none"])
def test_the_onnx_parity_builds_from_is_what_optimize_builds_from(parity_export, tmp_path, plugins):
    _, folder = parity_export("tiny")
    path = tmp_path / "model.onnx"
    path.write_bytes((folder / "model.onnx").read_bytes())
    prepared = runners.onnx_for_tensorrt(path, plugins, num_tokens=8)
    assert prepared == tmp_path / "model.trt.onnx"
    want = ir.load(folder / "model.onnx")
    prepare_for_tensorrt(want, plugins, num_tokens=8)  # what engine_from_onnx runs before the build
    assert _graph_signature(ir.load(prepared)) == _graph_signature(want)
    ops = {n.op_type for n in want.graph if n.domain == "moetrt"}
    assert ops == ({"TopKRouting", *SPARSE_MOE_PLUGINS} if plugins == "aot" else
                   {"TopKRouting", "SparseMoE"})


def test_trt_runner_hands_polygraphy_the_prepared_model(parity_export, tmp_path, monkeypatch):
    """With TensorRT and Polygraphy's loaders replaced by stand-ins: the network comes from the prepared file."""
    _, folder = parity_export("tiny")
    path = tmp_path / "marked.onnx"
    path.write_bytes((folder / "model.onnx").read_bytes())
    seen = {}
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr("moetrt.ops.plugins.register_plugins", lambda: [])
    import polygraphy.backend.trt as poly_trt

    class Profile(dict):
        def add(self, name, min, opt, max):  # noqa: A002  Polygraphy's keyword names
            self[name] = (min, opt, max)

    monkeypatch.setattr(poly_trt, "Profile", Profile)
    monkeypatch.setattr(poly_trt, "NetworkFromOnnxPath", lambda p, strongly_typed: seen.update(onnx=p) or "network")
    monkeypatch.setattr(poly_trt, "CreateConfig", lambda profiles: seen.update(profiles=profiles) or "config")
    monkeypatch.setattr(poly_trt, "EngineFromNetwork", lambda network, config: (lambda: "engine"))
    monkeypatch.setattr(poly_trt, "TrtRunner", lambda engine, name: (engine, name))
    shapes = {"input_ids": ((1, 1), (2, 5), (2, 9)), "attention_mask": ((1, 1), (2, 5), (2, 9))}
    assert runners.trt_runner(path, shapes, name="trt") == ("engine", "trt")
    prepared = ir.load(seen["onnx"])
    assert seen["onnx"] == str(tmp_path / "marked.trt.onnx")
    assert {n.op_type for n in prepared.graph if n.domain == "moetrt"} == {"TopKRouting", *SPARSE_MOE_PLUGINS}
    gate_up = next(n for n in prepared.graph if n.op_type == "MoEGateUp")
    assert gate_up.attributes["block_m"].as_int() == 16  # sized for the profile's 2 x 5 optimal tokens
    assert seen["profiles"][0]["input_ids"] == ((1, 1), (2, 5), (2, 9))
