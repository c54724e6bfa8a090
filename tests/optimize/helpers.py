"""Shared by the optimize tests: apply a pass to an exported graph, count nodes, run ONNX
Runtime on it and compare with the PyTorch reference on the positions that hold real tokens."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch

import moetrt
from moetrt.parity import Closeness, Tolerance, check_close, tolerance
from moetrt.state import past_name, present_name, state_contract

KV_NUMPY = {"fp32": np.float32, "fp16": np.float16}


def apply_pass(source: Path, out: Path, pass_fn, *args, **kwargs):
    """Load ``source`` (a model file, or a folder's model.onnx), run ``pass_fn(model, *args, **kwargs)``, save
    to ``out``; returns (result, model)."""
    source = Path(source)
    model = ir.load(source / "model.onnx" if source.is_dir() else source)
    result = pass_fn(model, *args, **kwargs)
    ir.save(model, out)
    return result, model


def node_counts(model: ir.Model, recursive: bool = True) -> Counter:
    """``"domain::op"`` (``"op"`` for the default domain) -> count, in subgraphs too."""
    nodes = ir.traversal.RecursiveGraphIterator(model.graph) if recursive else model.graph
    return Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in nodes)


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def batch_inputs(model, batch: int, seq: int, past: int, seed: int = 0, pad: bool = True):
    """ids [B, P+S], mask [B, P+S] (row 1 left-padded by up to 3 tokens), positions [B, P+S]."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, past + seq), generator=gen)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    if pad and batch > 1:
        mask[1, : min(3, past + seq - 1)] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def feeds(model, ids, mask, positions, past, kv_dtype=np.float32) -> dict:
    cfg = model.config
    out = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
    contract = state_contract(cfg)  # key/value, or MLA's latent/rope_key
    for i in range(cfg.num_hidden_layers):
        for j, entry in enumerate(contract.entries(i)):
            value = (past[i][j].numpy() if past is not None
                     else np.zeros(contract.shape(i, entry, ids.shape[0], 0), np.float32))
            out[past_name(i, entry)] = value.astype(kv_dtype)
    return out


def compare(model, sess, batch: int, seq: int, past: int, dtype: str = "fp32", seed: int = 0, pad: bool = True,
            tol: Tolerance | None = None) -> tuple[Closeness, Closeness, dict]:
    """Run the reference and ``sess`` on a batch with a KV cache of ``past`` tokens.

    Returns the closeness of the logits and of the worst present KV, on real (unpadded) positions
    only: padded query rows attend to nothing, so their values are arbitrary in every dtype.
    ``tol`` replaces the table's entries for ``dtype`` (logits and KV).
    """
    ids, mask, positions = batch_inputs(model, batch, seq, past, seed, pad)
    with torch.no_grad():
        prefix = model(ids[:, :past], mask[:, :past], positions[:, :past]) if past else None
        cache = prefix.past_key_values if prefix else None
        ref = model(ids[:, past:], mask, positions[:, past:], cache)
    names = [o.name for o in sess.get_outputs()]
    outputs = sess.run(None, feeds(model, ids[:, past:], mask, positions[:, past:], cache, KV_NUMPY[dtype]))
    got = dict(zip(names, outputs))
    real_q = mask[:, past:].bool().numpy()  # [B, S]
    real_kv = mask.bool().numpy()  # [B, P+S]
    logits = check_close(got["logits"][real_q], ref.logits.numpy()[real_q], tol or tolerance(dtype, "logits"))
    kv = []
    contract = state_contract(model.config)
    for i in range(model.config.num_hidden_layers):
        for j, entry in enumerate(contract.entries(i)):
            axis = entry.concat_axis  # the positions: [B, P, ...] after moving it next to the batch
            a = np.moveaxis(got[present_name(i, entry)].astype(np.float32), axis, 1)[real_kv]  # [n, ...]
            e = np.moveaxis(ref.past_key_values[i][j].numpy(), axis, 1)[real_kv]
            kv.append(check_close(a, e, tol or tolerance(dtype, "kv")))
    return logits, max(kv, key=lambda c: c.max_abs), got


def export_moe_layer(path: Path, num_experts: int = 8, dim: int = 128, ffn: int = 192, k: int = 2,
                     normalize: bool = True, seed: int = 0):
    """One MoE layer, x [T, D] -> y [T, D], exported as full models are; returns its torch MoEBlock."""
    from moetrt.export import onnx_moe_layer

    return onnx_moe_layer(path, num_experts, dim, ffn, k, normalize=normalize, seed=seed, std=0.1)


# --- the trained tiny model's held-out text: the perplexity the quantization bounds are stated in ----
def heldout_stream() -> list[int]:
    Tokenizer = pytest.importorskip("tokenizers").Tokenizer

    preset = Path(moetrt.__file__).parent / "presets" / "tiny"
    return Tokenizer.from_file(str(preset / "tokenizer.json")).encode((preset / "heldout.txt").read_text()).ids


def heldout_eval(sess, ids: list[int], seq: int = 128, batch: int = 16):
    """(perplexity, logits of every window) over windows of ``seq`` tokens, stride ``seq``, as the preset's card."""
    starts = [b for b in range(0, len(ids) - 1, seq) if b + seq + 1 <= len(ids)]
    nats, count, all_logits = 0.0, 0, []
    for i in range(0, len(starts), batch):
        window = np.array([ids[b : b + seq + 1] for b in starts[i : i + batch]], np.int64)  # [B, S+1]
        x, y = window[:, :-1], window[:, 1:]
        positions = np.tile(np.arange(seq), (len(x), 1))
        feeds = {"input_ids": x, "attention_mask": np.ones_like(x), "position_ids": positions}
        for inp in sess.get_inputs():
            if inp.name.startswith("past_key_values"):
                feeds[inp.name] = np.zeros((len(x), inp.shape[1], 0, inp.shape[3]), np.float32)
        logits = sess.run(["logits"], feeds)[0].astype(np.float64)  # [B, S, V]
        top = logits.max(-1, keepdims=True)
        lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
        nats += float((lse - np.take_along_axis(logits, y[..., None], -1)[..., 0]).sum())
        count += y.size
        all_logits.append(logits.astype(np.float32))
    return math.exp(nats / count), np.concatenate(all_logits)


def swapped_nibbles(model: ir.Model) -> ir.Model:
    """A copy of ``model`` with the two 4-bit halves of every uint8 initializer swapped: a layout error."""
    model = ir.from_proto(ir.to_proto(model))
    for name, value in model.graph.initializers.items():
        if value.dtype == ir.DataType.UINT8:
            q = value.const_value.numpy()
            value.const_value = ir.tensor((q >> 4) | (q << 4), name=name)
    return model
