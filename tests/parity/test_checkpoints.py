"""Checkpoints: every one is located in the canonical ONNX graph of each family and captured on the reference."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from moetrt.ops.topk_routing import routing_weights
from moetrt.parity import checkpoints_for, mark_checkpoints
from moetrt.parity.checkpoints import LAYER_POINTS, POINTS, capture, forward_order

VARIANTS = ["tiny", "mixtral", "qwen2_moe-shared", "qwen3_moe", "olmoe", "gpt_oss", "gpt_oss-defaults"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_marking_locates_every_checkpoint(parity_export, variant):
    model, folder = parity_export(variant)
    cfg = model.config
    proto = onnx.load(str(folder / "model.onnx"))
    marked, checkpoints = mark_checkpoints(proto, cfg)
    expected = checkpoints_for(cfg)
    assert [c.name for c in checkpoints] == [c.name for c in expected], "a checkpoint was not located"
    outputs = [o.name for o in marked.graph.output]
    assert len(outputs) == len(set(outputs))
    assert set(c.name for c in checkpoints) <= set(outputs)
    assert len(proto.graph.output) < len(outputs), "the caller's model is left unmarked"
    onnx.checker.check_model(marked)
    # every marked value is a distinct value of the graph (no two checkpoints alias one tensor)
    sources = {n.input[0] for n in marked.graph.node if n.name.startswith("parity_mark_")}
    marks = [n for n in marked.graph.node if n.name.startswith("parity_mark_")]
    assert len(sources) == len(marks)


def test_checkpoint_kinds_and_order(parity_export):
    model, _ = parity_export("qwen2_moe-shared")  # dense layers 0 and 2, MoE layers with a shared expert
    cfg = model.config
    checkpoints = checkpoints_for(cfg)
    by_name = {c.name: c for c in checkpoints}
    assert by_name["layers.0.mlp"].kind == "mlp" and by_name["layers.1.mlp"].kind == "experts"
    assert "layers.0.router_logits" not in by_name and by_name["layers.1.router_indices"].kind == "router"
    assert by_name["layers.1.shared_expert"].kind == "experts"
    assert by_name["present.2.key"].kind == "attention" and by_name["layers.2.input_norm"].kind == "norm"
    assert by_name["logits"].kind == "head" and by_name["embedding.output"].kind == "embedding"
    assert checkpoints == sorted(checkpoints, key=lambda c: forward_order(c, cfg.num_hidden_layers))
    assert set(LAYER_POINTS) | {"embedding", "norm", "logits"} == set(POINTS)


@pytest.mark.parametrize("variant", ["tiny", "qwen2_moe-shared"])
def test_capture_returns_every_checkpoint(parity_export, variant):
    model, _ = parity_export(variant)
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad(), capture(model) as values:
        out = model(ids, output_router=True, output_hidden_states=True)
    expected = {c.name for c in checkpoints_for(model.config)} - {"logits"} - {
        f"present.{i}.{k}" for i in range(model.config.num_hidden_layers) for k in ("key", "value")}
    assert set(values) == expected
    for n, layer in enumerate(model.config.moe_layers):
        torch.testing.assert_close(values[f"layers.{layer}.router_logits"], out.router_logits[n])
        torch.testing.assert_close(values[f"layers.{layer}.router_indices"], out.router_indices[n])
    for i in range(model.config.num_hidden_layers):
        torch.testing.assert_close(values[f"layers.{i}.output"], out.hidden_states[i + 1])


def plain_hidden(model, ids):
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states


def test_forced_routing_changes_only_the_forced_tokens(parity_export):
    model, _ = parity_export("tiny")
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    with torch.no_grad():
        plain = model(ids, output_router=True)
    layer = model.config.moe_layers[1]
    chosen = np.array([[7, 6], [5, 4]])
    rows = np.array([1, 4])
    with torch.no_grad(), capture(model, {layer: (rows, chosen)}) as values:
        forced = model(ids)
    indices = values[f"layers.{layer}.router_indices"]
    assert indices[rows].tolist() == chosen.tolist()
    keep = [0, 2, 3, 5]
    assert indices[keep].tolist() == plain.router_indices[1][keep].tolist()
    expected = routing_weights(values[f"layers.{layer}.router_logits"], indices, model.config.scoring,
                               model.config.normalize_topk, model.config.routed_scaling_factor)
    torch.testing.assert_close(values[f"layers.{layer}.router_weights"], expected)
    # earlier layers are untouched; the forced layer's output changes
    torch.testing.assert_close(values["layers.0.output"], plain_hidden(model, ids)[1])
    assert not torch.allclose(forced.logits, plain.logits)
