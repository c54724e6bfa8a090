"""Pass: the Gated DeltaNet's delta-rule ``Scan`` -> ``com.microsoft::LinearAttention`` (``update_rule="gated_delta"``).

The canonical export computes a linear-attention layer's recurrence as one ``Scan`` over the tokens
(:func:`moetrt.gated_deltanet.scan_gated_delta_rule`): a float32 state ``[B, H, Dk, Dv]`` carried
through, five scanned inputs ``[S, B, H, *]`` (L2-normalised and scaled queries, normalised keys,
values, log-decays ``g`` and update rates ``beta``, the key heads already repeated to the value
heads), one scanned output ``[S, B, H, Dv]``. Per token::

    S = S * exp(g);  S = S + k (beta (v - S^T k))^T;  o = S^T q

ONNX Runtime 1.32's ``com.microsoft::LinearAttention`` with ``update_rule="gated_delta"`` computes
``S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T``, ``o_t = scale q_t^T S_t``:
the same recurrence (checked numerically by the test beside the others, not assumed), on packed
``[B, S, H*D]`` inputs with ``g``, ``beta`` ``[B, S, H]``; ``scale=1`` because the export has
already scaled the queries. Its CPU kernel runs the chunked (WY) form for prefill and the
recurrent step for decode. (1.32 has no op named ``GatedDeltaNet``: ``LinearAttention`` is it.)

Reject by default: a ``Scan`` is rewritten only when its body is exactly the step above (the op
sequence the exporter writes for it), its state is float32 and rank 4 with static heads; any other
``Scan`` is left as it is with the reason. The causal conv stays standard ops (Concat, Conv, Slice):
``CausalConvWithState`` keeps its state in the input's dtype, as the export does, but its fused path
saves one Concat and one Slice per layer; it is left for a later pass.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ._common import PassResult, remove_dead_code

__all__ = ["lower_linear_attention", "SCAN_BODY"]

ORT_DOMAIN = "com.microsoft"
# the exporter's op sequence for one step of scan_gated_delta_rule (decay, memory read, delta, write, read out)
SCAN_BODY = ("Exp", "Unsqueeze", "Mul", "Unsqueeze", "Mul", "ReduceSum", "Sub", "Unsqueeze", "Mul", "Unsqueeze",
             "Unsqueeze", "Mul", "Add", "Unsqueeze", "Mul", "ReduceSum")


def _check(node: ir.Node) -> str | None:
    """None when ``node`` is the delta-rule Scan; else why it is left alone."""
    attrs = node.attributes
    if len(node.inputs) != 6 or len(node.outputs) != 2:
        return f"a Scan with {len(node.inputs)} inputs / {len(node.outputs)} outputs, not 1 state + 5 scanned -> 2"
    if attrs.get("num_scan_inputs") is None or attrs["num_scan_inputs"].as_int() != 5:
        return "not 5 scanned inputs"
    for name in ("scan_input_directions", "scan_output_directions", "scan_input_axes", "scan_output_axes"):
        if name in attrs and any(attrs[name].as_ints()):
            return f"{name} is not all 0 (forward, along axis 0)"
    body = attrs["body"].as_graph()
    ops = tuple(n.op_type for n in body)
    if ops != SCAN_BODY:
        return f"its body is not the gated delta rule's step ({len(ops)} ops: {', '.join(ops[:6])}, ...)"
    state = node.inputs[0]
    if state is None or state.dtype != ir.DataType.FLOAT:
        return "the state is not float32"
    if state.shape is None or len(state.shape) != 4 or not isinstance(state.shape[1], int):
        return "the state is not [B, H, Dk, Dv] with a static H"
    return None


def _const(graph: ir.Graph, name: str, ints) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(np.asarray(ints, np.int64), name=name))
    graph.register_initializer(value)
    return value


def _rewrite(graph: ir.Graph, scan: ir.Node, index: int) -> None:
    state, q, k, v, g, beta = scan.inputs
    old_state, old_out = scan.outputs
    heads = state.shape[1]
    prefix = f"linear_attention.{index}"
    nodes = []

    def add(op_type, inputs, domain="", **attributes):
        node = ir.node(op_type, list(inputs), attributes=attributes, domain=domain, name=f"{prefix}.{len(nodes)}")
        nodes.append(node)
        return node.outputs

    packed = _const(graph, f"{prefix}.packed", [0, 0, -1])
    heads_shape = _const(graph, f"{prefix}.heads", [0, 0, heads, -1])
    # [S, B, H, d] -> [B, S, H*d]; [S, B, H] -> [B, S, H]
    q, k, v = (add("Reshape", [add("Transpose", [x], perm=[1, 0, 2, 3])[0], packed])[0] for x in (q, k, v))
    g, beta = (add("Transpose", [x], perm=[1, 0, 2])[0] for x in (g, beta))
    la = ir.node("LinearAttention", [q, k, v, state, g, beta], domain=ORT_DOMAIN, num_outputs=2,
                 name=f"{prefix}.LinearAttention",
                 attributes={"q_num_heads": heads, "kv_num_heads": heads, "update_rule": "gated_delta", "scale": 1.0})
    nodes.append(la)
    out, new_state = la.outputs  # [B, S, H*Dv], [B, H, Dk, Dv]
    out = add("Transpose", [add("Reshape", [out, heads_shape])[0]], perm=[1, 0, 2, 3])[0]  # [S, B, H, Dv]
    out.type, out.shape = old_out.type, old_out.shape
    new_state.type, new_state.shape = old_state.type, old_state.shape
    for node in nodes:
        graph.insert_before(scan, node)
    name = old_state.name  # the present state is a graph output: it keeps its name
    ir.convenience.replace_all_uses_with(old_out, out)
    ir.convenience.replace_all_uses_with(old_state, new_state, replace_graph_outputs=True)
    graph.remove(scan, safe=True)
    new_state.name = name


def lower_linear_attention(model: ir.Model) -> PassResult:
    """Rewrite every delta-rule Scan into ``com.microsoft::LinearAttention``; returns what it changed."""
    result = PassResult("lower_linear_attention")
    graph = model.graph
    for node in [n for n in graph if n.op_type == "Scan" and n.domain in ("", "ai.onnx")]:
        reason = _check(node)
        if reason is not None:
            result.skipped[node.name or f"Scan {result.count + len(result.skipped)}"] = reason
            continue
        _rewrite(graph, node, result.count)
        result.count += 1
    if result.count:
        model.opset_imports.setdefault(ORT_DOMAIN, 1)
        remove_dead_code(model)
    result.details["LinearAttention"] = result.count
    return result
