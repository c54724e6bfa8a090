"""The ort-cpu lowering of the Gated DeltaNet's delta-rule Scan to ``com.microsoft::LinearAttention``.

Structure and numbers together: the kernel computes the reference recurrence, the optimized folder
holds one LinearAttention per linear-attention layer and no Scan, its outputs (logits and states)
equal the canonical export's on prefill and decode with non-zero states, its greedy tokens equal
transformers' generate, and a Scan that is not the delta rule is left as it is with the reason.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from moetrt.gated_deltanet import recurrent_gated_delta_rule
from moetrt.parity.tolerances import TOLERANCES, check_close

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

VARIANT = "qwen3_5_moe"
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [12, 13, 40, 41, 42], [20, 21, 22, 23, 24, 25, 26]]
# (batch, tokens, heads, Dk, Dv) of the kernel check
KERNEL_SHAPES = [(1, 1, 1, 4, 4), (2, 5, 3, 8, 6), (2, 70, 2, 16, 8)]


@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_attention_kernel_is_the_gated_delta_rule(shape):
    """Checked, not assumed: ORT's kernel on packed inputs == moetrt's recurrence (q already scaled)."""
    batch, tokens, heads, dk, dv = shape
    g = torch.Generator().manual_seed(tokens)
    q, k = torch.randn(batch, tokens, heads, dk, generator=g), torch.randn(batch, tokens, heads, dk, generator=g)
    v = torch.randn(batch, tokens, heads, dv, generator=g)
    decay, beta = -torch.rand(batch, tokens, heads, generator=g), torch.rand(batch, tokens, heads, generator=g)
    state = torch.randn(batch, heads, dk, dv, generator=g)
    ref, ref_state = recurrent_gated_delta_rule(q, k, v, decay, beta, state)
    # the inputs the export gives the Scan: L2-normalised q (scaled by Dk^-0.5) and k
    qn = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6) / dk**0.5
    kn = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    names = ["query", "key", "value", "past_state", "decay", "beta"]
    node = helper.make_node("LinearAttention", names, ["output", "present_state"], domain="com.microsoft",
                            q_num_heads=heads, kv_num_heads=heads, update_rule="gated_delta", scale=1.0)
    graph = helper.make_graph([node], "la", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("output", "present_state")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out, new_state = session.run(None, {
        "query": qn.reshape(batch, tokens, -1).numpy(), "key": kn.reshape(batch, tokens, -1).numpy(),
        "value": v.reshape(batch, tokens, -1).numpy(), "past_state": state.numpy(), "decay": decay.numpy(),
        "beta": beta.numpy()})
    tol = TOLERANCES[("fp32", "state")]
    assert check_close(out.reshape(batch, tokens, heads, dv), ref.numpy(), tol).ok
    assert check_close(new_state, ref_state.numpy(), tol).ok


def test_delta_rule_scans_lower_and_compute_the_same(optimized_variant):
    model, canonical, optimized = optimized_variant(VARIANT, target="ort-cpu")
    graph = onnx.load(str(optimized / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    linear = sum(t == "linear_attention" for t in model.config.layer_types)
    assert ops.count("LinearAttention") == linear > 0 and "Scan" not in ops
    assert all(n.domain == "com.microsoft" for n in graph.node if n.op_type == "LinearAttention")
    ref = ort.InferenceSession(str(canonical / "model.onnx"), providers=["CPUExecutionProvider"])
    low = ort.InferenceSession(str(optimized / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    state = {n: (rng.standard_normal(s) * 0.5).astype(np.float32) for n, s in model.state.empty_past(2).items()}
    names = [o.name for o in ref.get_outputs()]
    past = 0
    for seq in (9, 1):  # prefill on non-zero states, then a decode step on the states it left
        feeds = {"input_ids": rng.integers(1, 96, (2, seq)), "position_ids": np.arange(past, past + seq)[None].repeat(2, 0),
                 "attention_mask": np.ones((2, past + seq), np.int64), **state}
        a = dict(zip(names, ref.run(None, feeds)))
        b = dict(zip(names, low.run(None, feeds)))
        assert check_close(b["logits"], a["logits"], TOLERANCES[("fp32", "logits")]).ok
        for name in names[1:]:
            kind = "state" if name.endswith("_state") else "kv"
            assert check_close(b[name], a[name], TOLERANCES[("fp32", kind)]).ok, name
        state, past = {p: a[c] for c, p in model.state.pairs()}, past + seq


def test_lowered_greedy_tokens_match_transformers(optimized_variant, hf_tiny_model):
    from moetrt.runtime import Session
    from tests.hf_tiny import hf_greedy

    _, _, optimized = optimized_variant(VARIANT, target="ort-cpu")
    expected = hf_greedy(hf_tiny_model(VARIANT), PROMPTS, 32, 0)
    assert Session(optimized, backend="ort").generate(PROMPTS, max_new_tokens=32, stop_tokens=()).tokens == expected


def test_other_scans_are_left_alone():
    """Reject by default: a Scan whose body is not the delta rule's step keeps its place, with the reason."""
    import onnx_ir as ir

    from moetrt.optimize.linear_attention import lower_linear_attention

    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "x_in"], ["s_out"]), helper.make_node("Identity", ["s_out"], ["y_out"])],
        "body", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("s_in", "x_in")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("s_out", "y_out")])
    scan = helper.make_node("Scan", ["s0", "xs"], ["s", "ys"], num_scan_inputs=1, body=body)
    graph = helper.make_graph([scan], "cumsum", [helper.make_tensor_value_info("s0", TensorProto.FLOAT, [2]),
                                                 helper.make_tensor_value_info("xs", TensorProto.FLOAT, [3, 2])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("s", "ys")])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    result = lower_linear_attention(model)
    assert result.count == 0 and len(result.skipped) == 1
    assert "not 1 state + 5 scanned" in next(iter(result.skipped.values()))
    assert [n.op_type for n in model.graph] == ["Scan"]
