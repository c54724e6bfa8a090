"""A catalogue of broken artifacts: each function takes a canonical ONNX model and injects one bug
an exporter or an optimization pass could plausibly make, in place.

Parity must catch every one of them and name the layer and op kind where it starts.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["perturb_expert", "flip_normalize", "swap_gate_up", "wrong_rope_theta", "router_in_fp16", "perturb_norm",
           "initializer",
           "set_initializer", "topk_routing_node"]


def initializer(model: onnx.ModelProto, pattern: str) -> onnx.TensorProto:
    """The one initializer whose name matches ``pattern`` (a regex searched in the name)."""
    found = [t for t in model.graph.initializer if re.search(pattern, t.name)]
    assert len(found) == 1, f"{len(found)} initializers match {pattern!r}: {[t.name for t in found]}"
    return found[0]


def set_initializer(model: onnx.ModelProto, pattern: str, array: np.ndarray) -> None:
    tensor = initializer(model, pattern)
    tensor.CopyFrom(numpy_helper.from_array(array.astype(numpy_helper.to_array(tensor).dtype), tensor.name))


def topk_routing_node(model: onnx.ModelProto, layer: int) -> onnx.NodeProto:
    """The TopKRouting node of MoE layer ``layer`` (found through its name scope)."""
    nodes = []
    for node in model.graph.node:
        if node.op_type != "TopKRouting":
            continue
        scopes = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.name_scopes", "")
        if re.search(rf"layers\.{layer}\.mlp'", scopes):
            nodes.append(node)
    assert len(nodes) == 1, f"{len(nodes)} TopKRouting nodes in layer {layer}"
    return nodes[0]


def perturb_expert(model: onnx.ModelProto, layer: int, expert: int, scale: float = 0.05, seed: int = 0) -> None:
    """Add normal(0, scale * std) noise to one expert's down projection."""
    pattern = rf"layers\.{layer}\.mlp\.experts\.down_proj$"
    weights = numpy_helper.to_array(initializer(model, pattern)).copy()  # [E, D, F]
    noise = np.random.default_rng(seed).normal(0.0, scale * weights[expert].std(), weights[expert].shape)
    weights[expert] += noise.astype(weights.dtype)
    set_initializer(model, pattern, weights)


def perturb_norm(model: onnx.ModelProto, pattern: str, scale: float = 1.0, seed: int = 0) -> None:
    """Multiply an RMSNorm weight by 1 + normal(0, scale) per channel."""
    weight = numpy_helper.to_array(initializer(model, pattern))
    noise = np.random.default_rng(seed).standard_normal(weight.shape)
    set_initializer(model, pattern, weight * (1 + scale * noise))


def flip_normalize(model: onnx.ModelProto, layer: int) -> None:
    """Flip the ``normalize`` attribute of one TopKRouting node (renormalised top-k or not)."""
    node = topk_routing_node(model, layer)
    attribute = next(a for a in node.attribute if a.name == "normalize")
    attribute.i = 1 - attribute.i


def swap_gate_up(model: onnx.ModelProto, layer: int) -> None:
    """Swap the gate and up halves of one layer's w_gate_up [E, 2F, D] (a wrong weight layout)."""
    pattern = rf"layers\.{layer}\.mlp\.experts\.gate_up_proj$"
    weights = numpy_helper.to_array(initializer(model, pattern))
    half = weights.shape[1] // 2
    set_initializer(model, pattern, np.concatenate([weights[:, half:], weights[:, :half]], axis=1))


def wrong_rope_theta(model: onnx.ModelProto, head_dim: int, theta: float) -> None:
    """Rebuild the rotary inverse frequencies with another base (``rope_theta``)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    set_initializer(model, r"rotary\.inv_freq$", inv_freq)


def router_in_fp16(model: onnx.ModelProto, layer: int) -> None:
    """Round one layer's router logits through float16 before TopKRouting (router math must be fp32)."""
    node = topk_routing_node(model, layer)
    logits = node.input[0]
    half, back = f"{logits}_fp16_bug", f"{logits}_fp16_bug_fp32"
    index = list(model.graph.node).index(node)
    model.graph.node.insert(index, helper.make_node("Cast", [half], [back], to=TensorProto.FLOAT))
    model.graph.node.insert(index, helper.make_node("Cast", [logits], [half], to=TensorProto.FLOAT16))
    node.input[0] = back
    model.graph.value_info.extend([
        helper.make_tensor_value_info(half, TensorProto.FLOAT16, None),
        helper.make_tensor_value_info(back, TensorProto.FLOAT, None),
    ])
