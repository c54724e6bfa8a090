"""Streaming export of a checkpoint folder equals the in-memory export, and never holds the model.

Each case writes a small sharded checkpoint (per-expert layout as transformers saves it, or the
stacked ``experts.gate_up_proj`` layout; fp32 or bf16 on disk; tied embeddings), exports it both
ways, and compares the graphs node by node, every initializer byte by byte, and ONNX Runtime's
outputs.
"""

from __future__ import annotations

import json
import sys
import weakref

import numpy as np
import onnx
import pytest
import torch

import moetrt
from moetrt import CheckpointError
from moetrt.checkpoint import StoredTensor, checkpoint_sources
from moetrt.export import onnx_from_torch
from moetrt.export.streaming import EAGER_ELEMENTS, StreamedTensor

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

# (variant, on-disk layout, checkpoint dtype, export dtype, external data)
CASES = [
    ("mixtral", "per-expert", torch.float32, "fp32", True),
    ("mixtral-tied", "stacked", torch.bfloat16, "fp32", False),
    ("qwen3_moe", "per-expert", torch.float32, "bf16", True),
    # latent attention state, and a selection bias that stays float32 in an fp16 export
    ("deepseek_v3", "per-expert", torch.float32, "fp16", True),
]
# two layers, the vocabulary wide enough that the embedding is streamed (> EAGER_ELEMENTS), as
# the expert and attention weights are
OVERRIDES = {variant: dict(num_hidden_layers=2, vocab_size=160) for variant, *_ in CASES}


def _write_stacked(model: moetrt.MoETransformer, folder, dtype: torch.dtype, shards: int = 2) -> None:
    """The transformers v5 in-memory layout (``experts.gate_up_proj`` [E, 2F, D]) in ``shards`` files + index."""
    from safetensors.torch import save_file

    cfg = model.config
    tensors = {}
    for name, tensor in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        tensors[name if name == "lm_head.weight" else f"model.{name}"] = tensor.detach().to(dtype).contiguous()
    names = sorted(tensors)
    weight_map = {}
    for index in range(shards):
        file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[index::shards]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(moetrt.checkpoint.hf_config_from_config(cfg)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, hf_tiny_model):
    """(variant, layout, dtype) -> a sharded checkpoint folder, written once per module."""
    cache = {}

    def make(variant, layout, dtype):
        key = (variant, layout, dtype)
        if key not in cache:
            hf = hf_tiny_model(variant, **OVERRIDES[variant])
            folder = tmp_path_factory.mktemp(f"ckpt-{variant}-{layout}")
            if layout == "per-expert":
                hf.to(dtype).save_pretrained(folder, max_shard_size="40KB")
                assert (folder / "model.safetensors.index.json").exists()
            else:
                _write_stacked(moetrt.from_pretrained(hf), folder, dtype)
            cache[key] = folder
        return cache[key]

    return make


def _feeds(cfg, dtype="fp32", batch=3, seq=4, past=6, seed=0):
    from moetrt.dtypes import numpy_dtype
    from moetrt.state import state_contract

    rng = np.random.default_rng(seed)
    feeds = {
        "input_ids": rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int64),
        "attention_mask": np.ones((batch, past + seq), np.int64),
        "position_ids": np.broadcast_to(np.arange(past, past + seq), (batch, seq)).astype(np.int64),
    }
    state = state_contract(cfg)  # key/value [B, G, P, Hd], or latent [B, P, R] and rope_key [B, P, Dr]
    for name, shape in state.shapes(batch, past).items():
        element = state.entry_of(name)[1].element_dtype(dtype)
        feeds[name] = rng.standard_normal(shape).astype(numpy_dtype(element))
    return feeds


def _initializers(folder):
    proto = onnx.load(str(folder / "model.onnx"))
    return proto, {i.name: onnx.numpy_helper.to_array(i, base_dir=str(folder)) for i in proto.graph.initializer}


@pytest.mark.parametrize("variant,layout,ckpt_dtype,dtype,external", CASES)
def test_streaming_equals_in_memory_export(tmp_path, checkpoint, variant, layout, ckpt_dtype, dtype, external):
    folder = checkpoint(variant, layout, ckpt_dtype)
    streamed = onnx_from_torch(folder, tmp_path / "streamed", dtype=dtype, external_data=external, progress=False)
    in_memory = onnx_from_torch(folder, tmp_path / "in-memory", dtype=dtype, external_data=external, progress=False,
                                streaming=False)
    assert (streamed / "model.onnx.data").exists() == external

    proto_s, inits_s = _initializers(streamed)
    proto_m, inits_m = _initializers(in_memory)
    nodes = [(n.op_type, list(n.input), list(n.output)) for n in proto_s.graph.node]
    assert nodes == [(n.op_type, list(n.input), list(n.output)) for n in proto_m.graph.node]
    assert sorted(inits_s) == sorted(inits_m)
    for name, array in inits_m.items():
        got = inits_s[name]
        assert got.dtype == array.dtype and got.shape == array.shape, name
        assert got.tobytes() == array.tobytes(), f"initializer {name} differs"
    # the expert weights really went through the streamed path
    assert any(a.size > EAGER_ELEMENTS for a in inits_s.values())
    meta_s, meta_m = (json.loads((f / "moetrt.json").read_text()) for f in (streamed, in_memory))
    assert meta_s["export"] == meta_m["export"] and meta_s["source"] == meta_m["source"]

    cfg = moetrt.checkpoint.config_from_hf(json.loads((folder / "config.json").read_text()))
    if dtype == "bf16":
        return  # ONNX Runtime's CPU provider has no bf16 kernels for this graph: equal graphs and weights suffice
    feeds = _feeds(cfg, dtype)
    out_m = ort.InferenceSession(str(in_memory / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    out_s = ort.InferenceSession(str(streamed / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert len(out_s) == 1 + 2 * cfg.num_hidden_layers
    for got, want in zip(out_s, out_m):
        np.testing.assert_array_equal(got, want)


def test_streaming_never_builds_the_model(tmp_path, checkpoint, monkeypatch):
    """No state dict is loaded, each stored tensor is read once, and at most one is alive at a time."""
    folder = checkpoint("mixtral", "per-expert", torch.float32)

    def forbidden(*args, **kwargs):
        raise AssertionError("the streaming export loaded the whole model")

    monkeypatch.setattr(moetrt.checkpoint, "load_state", forbidden)
    monkeypatch.setattr(moetrt.checkpoint, "iter_safetensors", forbidden)
    monkeypatch.setattr(sys.modules["moetrt.export.onnx_from_torch"], "from_pretrained", forbidden)

    read = StoredTensor.read
    alive, peak, reads = {"bytes": 0}, {"bytes": 0}, {}

    def tracked(self):
        tensor = read(self)
        reads[self.name] = reads.get(self.name, 0) + 1
        alive["bytes"] += self.nbytes
        peak["bytes"] = max(peak["bytes"], alive["bytes"])
        weakref.finalize(tensor, lambda n=self.nbytes: alive.__setitem__("bytes", alive["bytes"] - n))
        return tensor

    monkeypatch.setattr(StoredTensor, "read", tracked)
    onnx_from_torch(folder, tmp_path / "out", external_data=True, progress=False)

    _, sources = checkpoint_sources(folder)
    pieces = [p for s in sources.values() for p in s.pieces]
    total, largest = sum(p.nbytes for p in pieces), max(p.nbytes for p in pieces)
    assert set(reads) == {p.name for p in pieces} and set(reads.values()) == {1}, reads
    # a materialised export holds every tensor at once (total); streaming one at a time (largest)
    assert total > 8 * largest
    assert peak["bytes"] <= largest, (peak["bytes"], largest, total)


def test_interrupted_export_leaves_no_folder(tmp_path, checkpoint, monkeypatch):
    folder = checkpoint("mixtral", "per-expert", torch.float32)
    writes = []

    def interrupted(self, file):
        writes.append(self.name)
        if len(writes) == 3:
            raise KeyboardInterrupt("interrupted while writing the weights")
        file.write(self.tobytes())

    monkeypatch.setattr(StreamedTensor, "tofile", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        onnx_from_torch(folder, out, external_data=True, progress=False)
    assert len(writes) == 3
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no half-written temporary folder either


def test_streaming_rejects_what_the_loader_rejects(tmp_path, checkpoint):
    """checkpoint_sources and from_pretrained accept and reject the same checkpoints, with the same message."""
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint("mixtral", "per-expert", torch.float32), folder)
    save_file({"model.layers.0.mlp.mystery.weight": torch.zeros(2, 2)}, str(folder / "extra.safetensors"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.mystery.weight"] = "extra.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    messages = []
    for call in (lambda: checkpoint_sources(folder), lambda: moetrt.from_pretrained(folder)):
        with pytest.raises(CheckpointError, match="mystery") as info:
            call()
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    with pytest.raises(CheckpointError, match="mystery"):
        onnx_from_torch(folder, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_streaming_needs_a_folder(tmp_path):
    with pytest.raises(moetrt.MoetrtError, match="checkpoint folder"):
        onnx_from_torch("tiny", tmp_path / "out", streaming=True, progress=False)


# the optimize passes that rewrite weights: (target, options, the pass and how many nodes it rewrites)
OPTIMIZE_CASES = [
    ("ort-cpu", dict(quantize_experts="int4"), ("quantize_experts_int4", 2)),  # QMoE: packed weights and scales
    # fp16 weights, interleaved gate/up for MoE
    ("ort-cuda", dict(precision="fp16", moe_lowering="always"), ("lower_moe", 2)),
    # MatMulNBits: 4 attention projections a layer and lm_head; asymmetric adds zero points
    ("ort-cpu", dict(quantize_weights="int4", weight_zero_points=True), ("quantize_weights_int4", 9)),
]


@pytest.mark.parametrize("target,options,rewrites", OPTIMIZE_CASES)
def test_optimize_rewrites_weights_one_at_a_time_when_saving(tmp_path, checkpoint, monkeypatch, target, options,
                                                             rewrites):
    """After the passes ran, no weight of the model is in memory: each is on disk or computed when saved."""
    pytest.importorskip("onnxscript")
    from moetrt.optimize import optimize

    export = onnx_from_torch(checkpoint("mixtral", "per-expert", torch.float32), tmp_path / "export",
                             external_data=True, progress=False)
    lower = sys.modules["moetrt.optimize.lower"]
    save = lower.save_model
    held = {}

    def checked(model, path, external_data, progress=None):
        for name, value in model.graph.initializers.items():
            tensor = value.const_value  # every large weight, and every weight a pass rewrote (small ones too)
            if tensor is not None and (tensor.size > EAGER_ELEMENTS or type(tensor).__name__ == "LazyTensor"):
                held[name] = type(tensor).__name__
        save(model, path, external_data, progress)

    monkeypatch.setattr(lower, "save_model", checked)
    out = optimize(export, tmp_path / "out", target=target, check_runtime=False, progress=False, **options)
    # untouched weights stay on disk, rewritten ones are computed when written; none is an array in memory
    assert held and set(held.values()) <= {"ExternalTensor", "LazyTensor"}, held
    assert "LazyTensor" in held.values()
    meta = json.loads((out / "moetrt.json").read_text())
    counts = {p["name"]: p["count"] for p in meta["optimize"]["passes"]}
    assert counts.get(rewrites[0]) == rewrites[1], counts
    _, inits = _initializers(out)
    assert sum(a.nbytes for a in inits.values()) > 0 and all(np.isfinite(a).all() for a in inits.values()
                                                             if a.dtype.kind == "f")


def test_slabs_write_the_same_bytes_and_find_nonfinite(tmp_path, checkpoint, monkeypatch):
    """Transposed weights are written, and NaN/Inf looked for, a slab at a time: same bytes, same warning."""
    import shutil

    from safetensors.torch import load_file, save_file

    import moetrt.export.streaming as streaming

    folder = checkpoint("mixtral", "per-expert", torch.float32)
    transposed = []
    make_transposed = StreamedTensor.transposed
    monkeypatch.setattr(StreamedTensor, "transposed",
                        lambda self, *a, **k: transposed.append(self.name) or make_transposed(self, *a, **k))
    onnx_from_torch(folder, tmp_path / "whole", external_data=True, progress=False)
    assert transposed, "the tiny model has no transposed streamed weight: the test checks nothing"
    monkeypatch.setattr(streaming, "SLAB_ELEMENTS", 5)  # many slabs, the last one partial
    onnx_from_torch(folder, tmp_path / "slabs", external_data=True, progress=False)
    assert (tmp_path / "slabs" / "model.onnx.data").read_bytes() == (tmp_path / "whole" / "model.onnx.data").read_bytes()

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    shard = broken / index["weight_map"]["lm_head.weight"]
    tensors = load_file(shard)
    tensors["lm_head.weight"].view(-1)[-1] = float("nan")  # in the last slab of a transposed weight
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="non-finite"):
        onnx_from_torch(broken, tmp_path / "broken-out", external_data=True, progress=False)
