"""Checkpoints: the named values of one forward pass that parity compares, in forward order.

A checkpoint is one value with a layer, a point in that layer and an op kind. The reference
produces it from module hooks (and from the two moetrt ops, seen through a dispatch mode); an ONNX
artifact produces it once :func:`mark_checkpoints` has made it a graph output of a copy of the
model (Polygraphy-style marking), found through the ``pkg.torch.onnx.name_scopes`` metadata the
exporter writes on every node.

output name (forward order)        op kind    value
---------------------------------  ---------  ------------------------------------------------------
embedding.output                   embedding  token embeddings [B, S, D]
layers.{i}.input_norm              norm       input RMSNorm output [B, S, D]
present.{i}.key, present.{i}.value attention  the layer's KV cache outputs [B, G, P+S, Hd]
layers.{i}.attention               attention  attention output after o_proj [B, S, D]
layers.{i}.post_attention_norm     norm       post-attention RMSNorm output [B, S, D]
layers.{i}.router_logits           router     TopKRouting input, fp32 [T, E]
layers.{i}.router_indices          router     chosen experts, int32 [T, K] (compared as sets)
layers.{i}.router_weights          router     their weights, fp32 [T, K] (compared in expert order)
layers.{i}.experts                 experts    SparseMoE output [T, D]
layers.{i}.shared_expert           experts    shared expert output [T, D] (Qwen2-MoE)
layers.{i}.mlp                     experts    the MoE block's output [B, S, D] (kind ``mlp`` on dense layers)
layers.{i}.output                  residual   the residual stream after the layer [B, S, D]
norm.output                        norm       final RMSNorm output [B, S, D]
logits                             head       [B, S, V]

The first checkpoint (in this order) that leaves tolerance names where an artifact goes wrong.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode  # torch's hook for seeing (custom) ops as they run

from moetrt.config import MoEConfig
from moetrt.model import MoETransformer
from moetrt.ops.topk_routing import TORCH_ARGS as TOPK_ROUTING_ARGS, routing_weights
from moetrt.state import (CONV_STATE, KEY, LATENT, PRESENT_PREFIX, RECURRENT_STATE, ROPE_KEY, VALUE, present_name,
                          state_contract)

__all__ = ["Checkpoint", "POINTS", "checkpoints_for", "forward_order", "default_name", "mark_checkpoints", "capture",
           "ForcedRouting"]

# point -> (op kind, tolerance kind); tolerance kind None: compared by the router analysis
POINTS: dict[str, tuple[str, str | None]] = {
    "embedding": ("embedding", "hidden"),
    "input_norm": ("norm", "hidden"),
    # the layer's state (moetrt.state): key and value, or multi-head latent attention's latent and rope_key
    **{f"{PRESENT_PREFIX}{entry.name}": ("attention", "kv") for entry in (KEY, VALUE, LATENT, ROPE_KEY)},
    # a linear-attention layer's fixed-size state (Gated DeltaNet)
    **{f"{PRESENT_PREFIX}{entry.name}": ("attention", "state") for entry in (CONV_STATE, RECURRENT_STATE)},
    "attention": ("attention", "hidden"),
    "post_attention_norm": ("norm", "hidden"),
    "router_logits": ("router", "router_logits"),
    "router_indices": ("router", None),
    "router_weights": ("router", "router_weights"),
    "experts": ("experts", "hidden"),
    "shared_expert": ("experts", "hidden"),
    "mlp": ("experts", "hidden"),
    "output": ("residual", "hidden"),
    "norm": ("norm", "hidden"),
    "logits": ("head", "logits"),
}
LAYER_POINTS = [p for p in POINTS if p not in ("embedding", "norm", "logits")]

# layer index -> {token rows [n], expert indices [n, K]} that replace the reference's choice
ForcedRouting = dict[int, tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Checkpoint:
    name: str  # the output name on both runners
    point: str  # a key of POINTS
    layer: int | None  # None for embedding, final norm and logits
    dense: bool = False  # an ``mlp`` checkpoint of a dense (non-MoE) layer

    @property
    def kind(self) -> str:
        """The op kind that computes this value: embedding, norm, attention, router, experts, mlp, residual, head."""
        return "mlp" if self.point == "mlp" and self.dense else POINTS[self.point][0]

    @property
    def tolerance_kind(self) -> str | None:
        return POINTS[self.point][1]


def default_name(point: str, layer: int | None) -> str:
    """The output name of a checkpoint (names never clash with the exporter's value names)."""
    if point.startswith(PRESENT_PREFIX):
        return present_name(layer, point.removeprefix(PRESENT_PREFIX))
    if layer is None:
        return "logits" if point == "logits" else f"{point}.output"
    return f"layers.{layer}.{point}"


def forward_order(c: Checkpoint, num_layers: int) -> tuple[int, int]:
    """Sort key: the order in which the forward pass computes the checkpoints."""
    if c.layer is None:
        return {"embedding": (-1, 0), "norm": (num_layers, 0), "logits": (num_layers, 1)}[c.point]
    return c.layer, LAYER_POINTS.index(c.point)


def checkpoints_for(config: MoEConfig, available: set[str] | None = None) -> list[Checkpoint]:
    """Every checkpoint the reference can produce for ``config`` in forward order (only ``available`` names if given)."""
    out = [Checkpoint(default_name("embedding", None), "embedding", None)]
    state = state_contract(config)
    for i in range(config.num_hidden_layers):
        moe = config.is_moe_layer(i)
        carried = {f"{PRESENT_PREFIX}{e.name}" for e in state.entries(i)}
        for point in LAYER_POINTS:
            if point.startswith(PRESENT_PREFIX) and point not in carried:
                continue  # state this layer does not carry
            if point.startswith("router_") or point == "experts":
                if not moe:
                    continue
            if point == "shared_expert" and not (moe and config.shared_expert_intermediate_size):
                continue
            out.append(Checkpoint(default_name(point, i), point, i, dense=not moe))
    out += [Checkpoint(default_name("norm", None), "norm", None), Checkpoint("logits", "logits", None)]
    if available is not None:
        out = [c for c in out if c.name in available]
    return out


# --- marking an ONNX model -----------------------------------------------------------------------
_LAYER_SCOPE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.(.+))?$")
_TOP_SCOPE = re.compile(r"(?:^|\.)(embed_tokens|norm|lm_head)$")


def _node_scope(node) -> tuple[int | None, str | None]:
    """(layer, sub-module path inside the layer) or (None, top-level module) of a node, from its name scopes."""
    meta = {p.key: p.value for p in node.metadata_props}
    raw = meta.get("pkg.torch.onnx.name_scopes")
    if not raw:
        return None, None
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return None, None
    for scope in reversed(scopes[:-1]):  # the last entry names the node itself
        match = _LAYER_SCOPE.search(scope)
        if match:
            return int(match.group(1)), match.group(2) or ""
        match = _TOP_SCOPE.search(scope)
        if match and "layers." not in scope:
            return None, match.group(1)
    return None, None


def _within(sub: str | None, prefix: str) -> bool:
    return sub is not None and (prefix == "" or sub == prefix or sub.startswith(prefix + "."))


def mark_checkpoints(proto, config: MoEConfig):
    """A copy of ``proto`` with every checkpoint it can locate added as a graph output.

    Returns ``(marked ModelProto, checkpoints in forward order)``. Checkpoints the graph does not
    show (a lowered graph may have fused them away) are left out; the graph outputs ``logits`` and
    ``present.*`` are always included when present.
    """
    import onnx

    model = copy.deepcopy(proto)
    graph = model.graph
    produced = sum(len(node.output) for node in graph.node)
    if len(graph.value_info) < produced // 2:  # a pass dropped the value types: infer them again
        try:
            model = onnx.shape_inference.infer_shapes(model, data_prop=False)
            graph = model.graph
        except Exception:  # noqa: BLE001 - best effort: checkpoints without a type are left out below
            pass
    types = {v.name: v.type for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    for init in graph.initializer:
        types.setdefault(init.name, onnx.helper.make_tensor_type_proto(init.data_type, list(init.dims)))
    graph_outputs = {o.name for o in graph.output}
    consumers: dict[str, list[int]] = {}
    for n, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(n)
    scopes = [_node_scope(node) for node in graph.node]
    hidden = config.hidden_size

    def is_hidden(value: str) -> bool:  # a float [..., D] activation of rank 3 or 2
        t = types.get(value)
        if t is None or not t.HasField("tensor_type"):
            return False
        dims = t.tensor_type.shape.dim
        return len(dims) in (2, 3) and dims[-1].HasField("dim_value") and dims[-1].dim_value == hidden

    def boundary(member) -> str | None:
        """The last-produced hidden-shaped value made inside ``member`` nodes and used outside them."""
        inside = [n for n in range(len(graph.node)) if member(scopes[n])]
        inside_set = set(inside)
        found = None
        for n in inside:
            for value in graph.node[n].output:
                if not value or value.startswith("present."):
                    continue
                used_outside = value in graph_outputs or any(c not in inside_set for c in consumers.get(value, []))
                if used_outside and is_hidden(value):
                    found = value
        return found

    located: dict[str, str] = {}  # checkpoint name -> value name in the graph
    for ckpt in checkpoints_for(config):
        layer, point = ckpt.layer, ckpt.point
        value = None
        if ckpt.name in graph_outputs:
            value = ckpt.name
        elif point == "embedding":
            value = boundary(lambda s: s == (None, "embed_tokens"))
        elif point == "norm":
            value = boundary(lambda s: s == (None, "norm"))
        elif point in ("router_logits", "router_weights", "router_indices", "experts"):
            op = "SparseMoE" if point == "experts" else "TopKRouting"
            nodes = [node for node, s in zip(graph.node, scopes) if node.op_type == op and s[0] == layer]
            if len(nodes) == 1:
                node = nodes[0]
                value = {"router_logits": node.input[0], "router_weights": node.output[0],
                         "router_indices": node.output[1] if len(node.output) > 1 else None,
                         "experts": node.output[0]}[point]
        elif point != "logits" and not point.startswith("present."):
            mixer = "linear_attn" if config.is_linear_attention_layer(layer) else "self_attn"
            sub = {"input_norm": "input_layernorm", "attention": mixer,
                   "post_attention_norm": "post_attention_layernorm",
                   "shared_expert": "mlp.shared_expert", "mlp": "mlp", "output": ""}[point]
            value = boundary(lambda s, sub=sub, layer=layer: s[0] == layer and _within(s[1], sub))
        if value:
            located[ckpt.name] = value

    if any(value not in types for value in located.values()):  # a pass left values without value_info
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=False).graph.value_info
        except Exception:  # noqa: BLE001 - inference is best effort; such checkpoints are left out below
            inferred = []
        for v in inferred:
            types.setdefault(v.name, v.type)
    existing = {v for node in graph.node for v in node.output} | {i.name for i in graph.input} | set(types)
    for name, value in list(located.items()):
        if name in graph_outputs:
            continue
        assert name not in existing, f"checkpoint name {name!r} clashes with a value of the graph"
        if value not in types:
            del located[name]  # no type to declare the output with
            continue
        graph.node.append(onnx.helper.make_node("Identity", [value], [name], name=f"parity_mark_{name}"))
        graph.output.append(onnx.helper.make_value_info(name, types[value]))
    checkpoints = checkpoints_for(config, set(located))
    return model, checkpoints


# --- capturing the reference ---------------------------------------------------------------------
class _MoEOps(TorchDispatchMode):
    """Records (and optionally overrides) the moetrt ops of one forward; calls arrive in layer order."""

    def __init__(self, moe_layers: list[int], forced: ForcedRouting | None):
        super().__init__()
        self.moe_layers, self.forced = moe_layers, forced or {}
        self.routing: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # layer -> logits, weights, indices
        self.experts: dict[int, torch.Tensor] = {}
        self._calls = {"TopKRouting": 0, "SparseMoE": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if getattr(func, "namespace", None) != "moetrt":
            return out
        op = func._schema.name.split("::")[-1]
        layer = self.moe_layers[self._calls[op]]
        self._calls[op] += 1
        if op == "TopKRouting":
            logits = args[0]
            weights, indices = out
            if layer in self.forced:
                rows, chosen = self.forced[layer]
                # the op's arguments by name; the weights come from the unbiased scores (the selection
                # bias and groups only choose), so the forced choice's weights need scoring, normalize, scale
                # and norm_min
                options = dict(zip(TOPK_ROUTING_ARGS, args[1:]), **kwargs)
                rows_t = torch.as_tensor(rows, dtype=torch.long)
                indices = indices.clone()
                indices[rows_t] = torch.as_tensor(chosen, dtype=indices.dtype)
                forced_weights = routing_weights(
                    logits[rows_t], indices[rows_t], options.get("scoring", "softmax"),
                    int(options.get("normalize", 0)), float(options.get("scale", 1.0)),
                    float(options.get("norm_min", 0.0)),
                )
                weights = weights.clone()
                weights[rows_t] = forced_weights
                out = (weights, indices)
            self.routing[layer] = (logits, weights, indices)
        elif op == "SparseMoE":
            self.experts[layer] = out
        return out


@contextlib.contextmanager
def capture(model: MoETransformer, forced: ForcedRouting | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Collect the checkpoints of the one forward pass run inside the block, keyed by checkpoint name.

    The dict is complete when the block exits (the router values arrive last).

    ``forced`` replaces the reference's expert choice for some tokens (weights recomputed from the
    reference's own router logits), so a near-tie the artifact broke the other way can be followed.
    """
    values: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name, pick=lambda out: out):
        def hook(_module, _inputs, output):
            values[name] = pick(output)
        return hook

    first = lambda out: out[0]  # noqa: E731
    handles.append(model.embed_tokens.register_forward_hook(keep(default_name("embedding", None))))
    handles.append(model.norm.register_forward_hook(keep(default_name("norm", None))))
    for i, layer in enumerate(model.layers):
        handles.append(layer.input_layernorm.register_forward_hook(keep(f"layers.{i}.input_norm")))
        mixer = layer.linear_attn if layer.linear else layer.self_attn  # linear attention: a Gated DeltaNet
        handles.append(mixer.register_forward_hook(keep(f"layers.{i}.attention", first)))
        handles.append(layer.post_attention_layernorm.register_forward_hook(keep(f"layers.{i}.post_attention_norm")))
        handles.append(layer.mlp.register_forward_hook(keep(f"layers.{i}.mlp", first if layer.is_moe else (lambda o: o))))
        if layer.is_moe and layer.mlp.shared_expert is not None:
            handles.append(layer.mlp.shared_expert.register_forward_hook(keep(f"layers.{i}.shared_expert")))
        handles.append(layer.register_forward_hook(keep(f"layers.{i}.output", first)))
    mode = _MoEOps(model.config.moe_layers, forced)
    try:
        with mode:
            yield values
    finally:
        for handle in handles:
            handle.remove()
    for layer, (logits, weights, indices) in mode.routing.items():
        values[f"layers.{layer}.router_logits"] = logits
        values[f"layers.{layer}.router_weights"] = weights
        values[f"layers.{layer}.router_indices"] = indices
    for layer, y in mode.experts.items():
        values[f"layers.{layer}.experts"] = y
