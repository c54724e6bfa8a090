"""Canonical ONNX export: ONNX Runtime matches the fp32 PyTorch reference on shapes not used at export.

The export traces with batch 2, seq 5, past 3; every shape below differs from that.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch

import moetrt
from moetrt.export import onnx_from_torch
from moetrt.parity import check_close, tolerance

ort = pytest.importorskip("onnxruntime")

# (batch, new tokens, past tokens): none is the traced (2, 5, 3)
SHAPES = [(1, 1, 0), (1, 1, 64), (3, 17, 0), (4, 300, 0), (2, 9, 64), (4, 1, 13), (1, 64, 1)]
FAMILY_VARIANTS = ["mixtral", "qwen2_moe-shared", "qwen3_moe", "olmoe", "mixtral-window", "gpt_oss", "gpt_oss-defaults",
                   # multi-head latent attention (state: latent, rope_key) and TopKRouting version 2
                   "deepseek_v3", "deepseek_v3-plain", "glm4_moe_lite",
                   # key/value attention with TopKRouting version 2 (selection bias; partial rotary)
                   "glm4_moe", "minimax_m2",
                   # Gemma 4: GeGLU experts beside a dense MLP, full layers with their own head dim, heads and RoPE
                   "gemma4_text",
                   # ERNIE-4.5-MoE: TopKRouting version 3 (norm_min), biases on every projection and lm_head
                   "ernie4_5_moe",
                   # Granite-MoE: embedding / residual / attention / logits multipliers, an ungated shared expert
                   "granitemoe", "granitemoeshared",
                   # DBRX: LayerNorm without bias, clip_qkv, the Euclidean norm of the top-k weights (dbrx) or their sum
                   "dbrx", "dbrx-sum",
                   # Llama 4: input-weighted experts, chunked attention (past 20 crosses chunks), NoPE temperature
                   "llama4_text"]


def _feeds(model, input_ids, mask, positions, past):
    cfg = model.config
    feeds = {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
    batch, state = input_ids.shape[0], model.state  # each layer's state entries (key/value, or latent/rope_key)
    for i in range(cfg.num_hidden_layers):
        for j, entry in enumerate(state.entries(i)):
            feeds[state.past_names(i)[j]] = (past[i][j].numpy() if past is not None
                                             else np.zeros(state.shape(i, entry, batch, 0), np.float32))
    return feeds


def _session(folder):
    return ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])


def _compare(model, session, batch, seq, past_len, seed=0):
    """Run reference and ONNX on a left-padded batch with a cache of ``past_len``; return closeness per kind."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, past_len + seq), generator=gen)
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    if batch > 1:  # left padding on row 1
        mask[1, : min(3, past_len + seq - 1)] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        prefix = model(ids[:, :past_len], mask[:, :past_len], positions[:, :past_len]) if past_len else None
        past = prefix.past_key_values if prefix else None
        ref = model(ids[:, past_len:], mask, positions[:, past_len:], past)
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, _feeds(model, ids[:, past_len:], mask, positions[:, past_len:], past))))
    logits = check_close(got["logits"], ref.logits.numpy(), tolerance("fp32", "logits"))
    kv = [check_close(got[name], ref.past_key_values[i][j].numpy(), tolerance("fp32", "kv"))
          for i in range(cfg.num_hidden_layers) for j, name in enumerate(model.state.present_names(i))]
    return logits, max(kv, key=lambda c: c.max_abs)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, hf_tiny_model):
    """variant -> (reference MoETransformer, exported folder), exported once per module."""
    cache = {}

    def get(variant, **kwargs):
        key = (variant, tuple(sorted(kwargs.items())))
        if key not in cache:
            if variant == "tiny":
                model = moetrt.from_pretrained("tiny")
            else:
                model = moetrt.from_pretrained(hf_tiny_model(variant))
            folder = tmp_path_factory.mktemp(f"onnx-{variant}") / "out"
            onnx_from_torch(model, folder, progress=False, **kwargs)
            cache[key] = (model, folder)
        return cache[key]

    return get


@pytest.mark.parametrize("batch,seq,past", SHAPES)
def test_tiny_matches_reference(exported, record_max, batch, seq, past):
    model, folder = exported("tiny")
    logits, kv = _compare(model, _session(folder), batch, seq, past)
    record_max("export fp32 max abs error (tiny)", f"logits b{batch} s{seq} p{past}", logits.max_abs)
    assert logits.ok, f"logits: {logits}"
    assert kv.ok, f"present KV: {kv}"
    assert logits.max_abs <= 1e-4


@pytest.mark.parametrize("variant", FAMILY_VARIANTS)
@pytest.mark.parametrize("batch,seq,past", [(1, 1, 0), (3, 17, 0), (2, 9, 20), (4, 1, 13)])
def test_families_match_reference(exported, record_max, variant, batch, seq, past):
    model, folder = exported(variant)
    logits, kv = _compare(model, _session(folder), batch, seq, past, seed=batch * 100 + seq)
    record_max("export fp32 max abs error (families)", f"{variant} logits", logits.max_abs)
    assert logits.ok, f"{variant} logits: {logits}"
    assert kv.ok, f"{variant} present KV: {kv}"


def test_greedy_decoding_through_onnx_matches_pytorch(exported):
    """32 greedy steps, each side feeding its own KV cache back."""
    model, folder = exported("tiny")
    session = _session(folder)
    names = [o.name for o in session.get_outputs()]
    cfg = model.config
    prompt = torch.tensor([[1, 70, 101, 32, 114, 101, 116, 117, 114, 110]])
    ids_ref, ids_onnx = prompt.clone(), prompt.clone()
    past_ref, past_onnx = None, None
    step_ids_ref, step_ids_onnx = prompt, prompt
    for _ in range(32):
        total = ids_ref.shape[1]
        new = step_ids_ref.shape[1]
        positions = torch.arange(total - new, total)[None]
        with torch.no_grad():
            out = model(step_ids_ref, torch.ones(1, total, dtype=torch.long), positions, past_ref)
        past_ref = out.past_key_values
        step_ids_ref = out.logits[:, -1].argmax(-1, keepdim=True)
        ids_ref = torch.cat([ids_ref, step_ids_ref], 1)

        feeds = {"input_ids": step_ids_onnx.numpy(), "attention_mask": np.ones((1, total), np.int64),
                 "position_ids": positions.numpy()}
        for i in range(cfg.num_hidden_layers):
            for j, kind in enumerate(("key", "value")):
                feeds[f"past_key_values.{i}.{kind}"] = (
                    past_onnx[f"present.{i}.{kind}"] if past_onnx
                    else np.zeros((1, cfg.num_key_value_heads, 0, cfg.head_dim), np.float32))
        got = dict(zip(names, session.run(None, feeds)))
        past_onnx = got
        step_ids_onnx = torch.from_numpy(got["logits"][:, -1].argmax(-1)[:, None])
        ids_onnx = torch.cat([ids_onnx, step_ids_onnx], 1)
    assert ids_onnx.tolist() == ids_ref.tolist()


def test_runs_in_plain_onnxruntime_without_moetrt(exported, tmp_path):
    """A fresh interpreter with only onnxruntime and numpy runs the canonical model."""
    _, folder = exported("tiny")
    script = textwrap.dedent(f"""
        import sys, numpy as np, onnxruntime as ort
        s = ort.InferenceSession({str(folder / "model.onnx")!r}, providers=["CPUExecutionProvider"])
        feeds = {{}}
        for i in s.get_inputs():
            if i.name == "input_ids": feeds[i.name] = np.array([[1, 5, 9]], np.int64)
            elif i.name == "position_ids": feeds[i.name] = np.array([[0, 1, 2]], np.int64)
            elif i.name == "attention_mask": feeds[i.name] = np.ones((1, 3), np.int64)
            else: feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
        out = s.run(["logits"], feeds)[0]
        assert out.shape[:2] == (1, 3) and np.isfinite(out).all()
        assert not any(m.startswith("moetrt") for m in sys.modules), "moetrt was imported"
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def _routing_model(num_experts, k, zero_attention=False):
    """A small random model; with ``zero_attention`` a token's route depends on its id alone."""
    cfg = moetrt.MoEConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, num_experts=num_experts, num_experts_per_tok=k,
                           intermediate_size=24, max_position_embeddings=128)
    model = moetrt.MoETransformer.from_config(cfg, seed=3, std=0.2)
    if zero_attention:
        with torch.no_grad():
            for layer in model.layers:
                layer.self_attn.o_proj.weight.zero_()
    return model


@pytest.mark.parametrize("num_experts,k", [(4, 4), (6, 1), (1, 1), (8, 3)])
def test_routing_edge_cases(tmp_path, num_experts, k):
    """k = E (every expert hit), top-1, a single expert, a single token (the decode path)."""
    model = _routing_model(num_experts, k)
    folder = onnx_from_torch(model, tmp_path / "m", router_outputs=True, progress=False)
    session = _session(folder)
    for batch, seq, past in [(1, 1, 0), (2, 40, 0), (1, 1, 5), (3, 2, 1)]:
        logits, kv = _compare(model, session, batch, seq, past)
        assert logits.ok and kv.ok, (batch, seq, past, logits, kv)
    if k == num_experts:
        ids = torch.randint(0, 64, (2, 30))
        got = dict(zip([o.name for o in session.get_outputs()],
                       session.run(None, _feeds(model, ids, torch.ones(2, 30, dtype=torch.long),
                                                torch.arange(30)[None].expand(2, 30), None))))
        assert set(np.unique(got["router_indices.0"]).tolist()) == set(range(num_experts))


def test_experts_hit_by_no_token(tmp_path):
    """Many tokens (the sorted path: T*k >= E) that all route to the same k experts: the rest get none."""
    model = _routing_model(8, 2, zero_attention=True)
    folder = onnx_from_torch(model, tmp_path / "m", router_outputs=True, progress=False)
    session = _session(folder)
    ids = torch.full((2, 12), 7)
    mask = torch.ones(2, 12, dtype=torch.long)
    positions = torch.arange(12)[None].expand(2, 12)
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, _feeds(model, ids, mask, positions, None))))
    for layer in model.config.moe_layers:
        hit = np.unique(got[f"router_indices.{layer}"])
        assert len(hit) == 2, f"layer {layer} routes to {hit.tolist()}: expected exactly 2 experts hit"
    with torch.no_grad():
        ref = model(ids, mask, positions)
    assert check_close(got["logits"], ref.logits.numpy(), tolerance("fp32", "logits")).ok


def test_router_outputs_match_reference(exported):
    model, folder = exported("tiny", router_outputs=True)
    session = _session(folder)
    ids = torch.randint(0, model.config.vocab_size, (3, 21))
    mask = torch.ones(3, 21, dtype=torch.long)
    positions = torch.arange(21)[None].expand(3, 21)
    with torch.no_grad():
        ref = model(ids, mask, positions, output_router=True)
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, _feeds(model, ids, mask, positions, None))))
    for n, layer in enumerate(model.config.moe_layers):
        assert got[f"router_indices.{layer}"].dtype == np.int32
        np.testing.assert_array_equal(got[f"router_indices.{layer}"], ref.router_indices[n].numpy())
        assert check_close(got[f"router_weights.{layer}"], ref.router_weights[n].numpy(),
                           tolerance("fp32", "router_weights")).ok


def test_fp16_export_keeps_router_and_logits_fp32(exported, record_max):
    model, folder = exported("tiny", dtype="fp16")
    proto = onnx.load(str(folder / "model.onnx"))
    types = {v.name: v.type.tensor_type.elem_type for v in list(proto.graph.input) + list(proto.graph.output)}
    assert types["logits"] == onnx.TensorProto.FLOAT
    assert types["past_key_values.0.key"] == onnx.TensorProto.FLOAT16
    # router logits feed TopKRouting in float32
    values = {v.name: v.type.tensor_type.elem_type for v in proto.graph.value_info}
    for node in proto.graph.node:
        if node.op_type == "TopKRouting":
            assert values.get(node.input[0], onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT
    try:
        session = _session(folder)
    except Exception as exc:  # ORT CPU lacks some fp16 kernels on some builds
        pytest.skip(f"ONNX Runtime CPU cannot run this fp16 graph here: {exc}")
    ids = torch.randint(0, model.config.vocab_size, (2, 33))
    mask = torch.ones(2, 33, dtype=torch.long)
    positions = torch.arange(33)[None].expand(2, 33)
    feeds = _feeds(model, ids, mask, positions, None)
    for name in feeds:
        if name.startswith("past_key_values"):
            feeds[name] = feeds[name].astype(np.float16)
    got = session.run(["logits"], feeds)[0]
    with torch.no_grad():
        ref = model(ids, mask, positions).logits.numpy()  # the fp32 reference
    close = check_close(got, ref, tolerance("fp16", "logits"))
    record_max("export fp16 max abs error vs fp32 reference", "tiny logits", close.max_abs)
    assert close.ok, str(close)


@pytest.mark.parametrize("dtype,elem", [("fp32", onnx.TensorProto.FLOAT), ("fp16", onnx.TensorProto.FLOAT16)])
def test_latent_attention_export_carries_the_latent_cache(exported, dtype, elem):
    """DeepSeek-V3's state is latent [B, P, R] and rope_key [B, P, Dr] per layer, in the model dtype; its
    routing imports moetrt opset 2 and keeps the selection bias float32 in an fp16 export."""
    model, folder = exported("deepseek_v3", dtype=dtype)
    cfg, state = model.config, model.state
    proto = onnx.load(str(folder / "model.onnx"))
    inputs = {v.name: v.type.tensor_type for v in proto.graph.input}
    outputs = {v.name: v.type.tensor_type for v in proto.graph.output}
    dims = lambda t: [d.dim_param or d.dim_value for d in t.shape.dim]  # noqa: E731
    for i in range(cfg.num_hidden_layers):
        assert state.past_names(i) == (f"past_key_values.{i}.latent", f"past_key_values.{i}.rope_key")
        assert dims(inputs[f"past_key_values.{i}.latent"]) == ["batch_size", "past_sequence_length", cfg.kv_lora_rank]
        assert dims(outputs[f"present.{i}.rope_key"]) == ["batch_size", "total_sequence_length", cfg.qk_rope_head_dim]
        assert inputs[f"past_key_values.{i}.latent"].elem_type == elem == outputs[f"present.{i}.latent"].elem_type
    assert not any(".key" in name or ".value" in name for name in inputs)
    assert {o.domain: o.version for o in proto.opset_import}["moetrt"] == 2
    meta = json.loads((folder / "moetrt.json").read_text())
    assert meta["io"]["state"] == state.to_dict() and meta["export"]["domain"] == {"moetrt": 2}
    routing = [n for n in proto.graph.node if n.op_type == "TopKRouting"]
    initializers = {t.name: t for t in proto.graph.initializer}
    assert len(routing) == len(cfg.moe_layers) and all(len(n.input) == 2 for n in routing)
    assert all(initializers[n.input[1]].data_type == onnx.TensorProto.FLOAT for n in routing)  # selection bias

    batch, seq, past = 3, 4, 7  # not the traced shapes; ORT runs the graph and the state grows along axis 1
    session = _session(folder)
    feeds = {"input_ids": np.ones((batch, seq), np.int64), "attention_mask": np.ones((batch, past + seq), np.int64),
             "position_ids": np.broadcast_to(np.arange(past, past + seq), (batch, seq)).astype(np.int64)}
    rng = np.random.default_rng(0)
    for name, shape in state.shapes(batch, past).items():
        feeds[name] = rng.standard_normal(shape).astype(onnx.helper.tensor_dtype_to_np_dtype(elem))
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    for name in state.all_present_names():
        assert got[name].shape == state.shape(*state.entry_of(name), batch, past + seq)
        np.testing.assert_array_equal(got[name][:, :past], feeds[name.replace("present.", "past_key_values.")])
    assert np.isfinite(got["logits"]).all()


def test_bf16_export_is_valid_onnx(tmp_path):
    model = _routing_model(4, 2)
    folder = onnx_from_torch(model, tmp_path / "bf16", dtype="bf16", progress=False)
    proto = onnx.load(str(folder / "model.onnx"))
    types = {v.name: v.type.tensor_type.elem_type for v in list(proto.graph.input) + list(proto.graph.output)}
    assert types["logits"] == onnx.TensorProto.FLOAT
    assert types["present.1.value"] == onnx.TensorProto.BFLOAT16
    assert model.dtype == torch.float32, "the caller's model must not be converted in place"


def test_external_data(tmp_path):
    model = _routing_model(4, 2)
    folder = onnx_from_torch(model, tmp_path / "ext", external_data=True, progress=False)
    assert (folder / "model.onnx.data").stat().st_size > 0
    meta = json.loads((folder / "moetrt.json").read_text())
    assert meta["export"]["external_data"] is True and "model.onnx.data" in meta["files"]
    logits, kv = _compare(model, _session(folder), 2, 7, 4)
    assert logits.ok and kv.ok


def test_tokenizer_files_travel_with_the_export(exported):
    _, folder = exported("tiny")
    meta = json.loads((folder / "moetrt.json").read_text())
    assert "tokenizer.json" in meta["tokenizer_files"]
    assert (folder / "tokenizer.json").read_bytes() == (moetrt.checkpoint.PRESET_DIR / "tiny" / "tokenizer.json").read_bytes()
    assert meta["source"] == "tiny"
    assert meta["config"] == moetrt.from_pretrained("tiny").config.to_dict()
