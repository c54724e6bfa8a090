"""The TensorRT back end: engine-folder checks on any machine, and (marked ``trt``) real engines.

Without TensorRT: the engine folder's ``moetrt.json`` is read and checked (format, version,
files), an engine built for another GPU or TensorRT version is refused with a rebuild hint, each
step's shapes are matched to a profile (or refused, naming the axis and a wider profile), and a
missing TensorRT names the package to install.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import sys
import types
import warnings

import numpy as np
import pytest

import moetrt
from moetrt.errors import BackendMissingError, CheckpointError, MoetrtError
from moetrt.runtime import Session
from moetrt.runtime.backend_trt import TrtBackend, check_engine_compatible, find_profile, read_engine_folder

CONFIG = moetrt.MoEConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, intermediate_size=24,
                          max_position_embeddings=128)
DECODE = {"axes": {"batch": [1, 4, 8], "seq": [1, 1, 1], "past": [0, 64, 127], "total": [1, 65, 128]}}
PREFILL = {"axes": {"batch": [1, 1, 2], "seq": [1, 64, 128], "past": [0, 0, 0], "total": [1, 64, 128]}}
META = {
    "format": "moetrt-trt", "format_version": 1, "config": CONFIG.to_dict(),
    "export": {"target": "trt", "dtype": "fp16", "router_outputs": False},
    "engine": {"file": "model.engine", "precision": "fp16", "plugins": "aot", "profiles": [DECODE, PREFILL]},
    "tensorrt": {"version": "10.13.0.35"},
    "device": {"name": "NVIDIA H200", "compute_capability": "9.0"},
    "onnx_source": {"folder": "/data/exported/tiny"},
}

# (TensorRT here, GPU here, compute capability here, words of the error or None)
COMPATIBILITY = [
    ("10.13.0.35", "NVIDIA H200", "9.0", None),
    ("10.13.0.40", "NVIDIA H200", "9.0", None),  # another build of the same release loads
    ("10.12.0.36", "NVIDIA H200", "9.0", "built with TensorRT 10.13.0.35, and this machine has TensorRT 10.12.0.36"),
    ("11.0.0.1", "NVIDIA H200", "9.0", "engines do not load across TensorRT versions"),
    ("10.13.0.35", "NVIDIA L40S", "8.9", "built for NVIDIA H200 (compute capability 9.0), and this GPU is NVIDIA L40S"),
    ("10.13.0.35", "NVIDIA B200", "10.0", "engines are specific to the GPU"),
]
# (batch, seq, past, expected profile index or words of the error)
STEPS = [
    (4, 1, 100, 0),  # a decode step
    (1, 64, 0, 1),  # a prefill: only the second profile holds seq 64
    (2, 1, 0, 0),  # first fitting profile wins
    (9, 1, 10, "batch 9 not in 1..8"),
    (1, 200, 0, "seq 200 not in 1..128"),
    (2, 2, 5, "seq 2 not in 1..1"),
]


def _folder(tmp_path, meta=None, engine: bool = True):
    folder = tmp_path / "engine"
    folder.mkdir(exist_ok=True)
    (folder / "moetrt.json").write_text(json.dumps(meta or META))
    if engine:
        (folder / "model.engine").write_bytes(b"engine")
    return folder


@pytest.mark.parametrize("version,name,capability,words", COMPATIBILITY)
def test_engine_compatibility(version, name, capability, words):
    if words is None:
        check_engine_compatible(META, version, name, capability)
        return
    with pytest.raises(MoetrtError, match=re.escape(words)) as exc:
        check_engine_compatible(META, version, name, capability)
    assert "rebuild it on this machine: moetrt optimize /data/exported/tiny --target trt" in str(exc.value)


def test_same_capability_other_gpu_only_warns():
    with pytest.warns(UserWarning, match="tuned for the other GPU"):
        check_engine_compatible(META, "10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0")


@pytest.mark.parametrize("batch,seq,past,expected", STEPS)
def test_profile_of_a_step(batch, seq, past, expected):
    profiles = [DECODE, PREFILL]
    if isinstance(expected, int):
        assert find_profile(profiles, batch, seq, past) == expected
        return
    with pytest.raises(MoetrtError, match=expected) as exc:
        find_profile(profiles, batch, seq, past)
    assert "rebuild the engine with a wider profile, e.g. --profile batch=" in str(exc.value)


def test_wider_profile_hint_covers_the_step():
    with pytest.raises(MoetrtError) as exc:
        find_profile([DECODE], 16, 1, 300)
    hint = str(exc.value).split("--profile ")[1]
    assert hint == "batch=1:4:16,seq=1:1:1,past=0:64:300"


def test_engine_folder_is_read(tmp_path):
    info = read_engine_folder(_folder(tmp_path))
    assert info.config == CONFIG and info.dtype == "fp16" and info.plugins == "aot" and not info.router_outputs
    assert info.engine_path.name == "model.engine" and len(info.profiles) == 2


@pytest.mark.parametrize("change,error,words", [
    (lambda m: m.update(format="moetrt-onnx"), MoetrtError, "build an engine from it first"),
    (lambda m: m.update(format="something-else"), MoetrtError, "not a moetrt artifact|unknown format"),
    (lambda m: m.update(format="moetrt-parity"), CheckpointError, "runs 'moetrt-trt' folders"),
    (lambda m: m.update(format_version=2), CheckpointError, "rebuild the engine with this moetrt"),
    (lambda m: m["engine"].pop("profiles"), CheckpointError, "is incomplete"),
    (lambda m: m["engine"].update(precision="int8"), CheckpointError, "not valid"),
])
def test_bad_engine_folders(tmp_path, change, error, words):
    meta = copy.deepcopy(META)
    change(meta)
    with pytest.raises(error, match=words):
        read_engine_folder(_folder(tmp_path, meta))


def test_missing_engine_file(tmp_path):
    with pytest.raises(CheckpointError, match="has no model.engine"):
        read_engine_folder(_folder(tmp_path, engine=False))


def test_missing_tensorrt_names_the_package(tmp_path, monkeypatch):
    folder = _folder(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendMissingError, match=r"the trt back end needs TensorRT.*pip install tensorrt \(10.9 or newer"):
        TrtBackend(folder)
    with pytest.raises(BackendMissingError, match="pip install"):
        Session(folder, backend="trt")


def test_trt_runs_on_gpus_only(tmp_path):
    with pytest.raises(MoetrtError, match="runs on NVIDIA GPUs"):
        TrtBackend(_folder(tmp_path), device="cpu")


def test_an_exported_folder_is_not_an_engine(tmp_path, monkeypatch):
    from moetrt.export import onnx_from_torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = onnx_from_torch(moetrt.MoETransformer.from_config(CONFIG), tmp_path / "exported", progress=False)
    with pytest.raises(MoetrtError, match="--target trt -o ENGINE_DIR"):
        read_engine_folder(exported)
    # with a TensorRT present (a stand-in: nothing gets as far as using it), Session says the same
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.13.0.35"))
    with pytest.raises(MoetrtError, match="build an engine from it first"):
        Session(exported, backend="trt")


# --- one step's bindings, with a stand-in for TensorRT's execution context ------------------------
class FakeContext:
    """Records what the back end tells TensorRT; output shapes as the engine would infer them."""

    def __init__(self):
        self.shapes, self.addresses, self.profiles, self.runs = {}, {}, [], 0

    def set_optimization_profile_async(self, index, stream):
        self.profiles.append(index)

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def infer_shapes(self):
        return []

    def get_tensor_shape(self, name):
        batch, seq = self.shapes["input_ids"]
        past = self.shapes["past_key_values.0.key"][2]
        if name == "logits":
            return (batch, seq, CONFIG.vocab_size)
        return (batch, CONFIG.num_key_value_heads, past + seq, CONFIG.head_dim)

    def execute_async_v3(self, stream):
        self.runs += 1
        return True


def _fake_backend(tmp_path, kv_dtype="float16"):
    import contextlib

    import torch

    from moetrt.runtime.backend import ModelSpec

    info = read_engine_folder(_folder(tmp_path))
    spec = ModelSpec.from_config(CONFIG, kv_dtype, router_outputs=False)
    kv = {"float16": torch.float16, "bfloat16": torch.bfloat16}[kv_dtype]
    dtypes = {n: (torch.int64 if n in ("input_ids", "attention_mask", "position_ids") else kv) for n in spec.input_names}
    dtypes.update({n: (torch.float32 if n == "logits" else kv) for n in spec.output_names})
    backend = TrtBackend.__new__(TrtBackend)  # everything but TensorRT's engine and CUDA
    backend.__dict__.update(
        _torch=torch, info=info, config=CONFIG, spec=spec, device="cpu", _device=torch.device("cpu"),
        _inputs=spec.input_names, _outputs=spec.output_names, _dtypes=dtypes, _kv_dtype=kv, context=FakeContext(),
        _placeholder=torch.empty(64, dtype=torch.uint8), _profile=0, _on_stream=contextlib.ExitStack,
        _stream_handle=lambda: 0,
    )
    return backend


def _feeds(batch, seq, past_feeds):
    ids = np.arange(batch * seq, dtype=np.int64).reshape(batch, seq) % CONFIG.vocab_size
    total = seq + past_feeds["past_key_values.0.key"].shape[2]
    return {"input_ids": ids, "attention_mask": np.ones((batch, total), np.int64),
            "position_ids": np.tile(np.arange(total - seq, total), (batch, 1)), **past_feeds}


def test_a_step_binds_device_buffers_and_keeps_the_cache_in_them(tmp_path):
    backend = _fake_backend(tmp_path)
    context = backend.context
    out = backend.forward(_feeds(2, 1, backend.empty_past(2)))  # a decode-shaped first step: profile 0
    assert context.profiles == [] and context.runs == 1
    assert context.shapes["past_key_values.1.value"] == (2, 1, 0, CONFIG.head_dim)
    assert context.addresses["past_key_values.0.key"] == backend._placeholder.data_ptr()  # empty tensors get a real address
    assert out["logits"].shape == (2, 1, CONFIG.vocab_size) and out["logits"].dtype == np.float32
    present = out["present.1.value"]
    assert present.shape == (2, 1, 1, CONFIG.head_dim) and context.addresses["present.1.value"] == present.data_ptr()
    past = {name.replace("present.", "past_key_values."): value for name, value in out.items() if name.startswith("present.")}
    backend.forward(_feeds(2, 1, past))
    # the previous step's outputs are bound as they are: no copy of the KV cache
    assert context.addresses["past_key_values.1.value"] == present.data_ptr()
    assert context.shapes["attention_mask"] == (2, 2)


def test_steps_switch_profiles_and_out_of_range_steps_never_run(tmp_path):
    backend = _fake_backend(tmp_path)
    context = backend.context
    backend.forward(_feeds(1, 64, backend.empty_past(1)))  # a prefill: only PREFILL holds seq 64
    backend.forward(_feeds(1, 64, backend.empty_past(1)))
    backend.forward(_feeds(3, 1, backend.empty_past(3)))
    assert context.profiles == [1, 0] and context.runs == 3
    with pytest.raises(MoetrtError, match="batch 9 not in 1..8"):
        backend.forward(_feeds(9, 1, backend.empty_past(9)))
    assert context.runs == 3
    with pytest.raises(MoetrtError, match="without router outputs"):
        backend.forward(_feeds(1, 1, backend.empty_past(1)), want_router=True)


def test_a_generation_is_checked_against_the_profiles_up_front(tmp_path):
    backend = _fake_backend(tmp_path)
    backend.check_lengths(2, 64, 65)  # prefill in PREFILL (batch <= 2), decode steps in DECODE (past 64..127)
    with pytest.raises(MoetrtError, match=r"generating 66 tokens .*past 128 not in 0..127"):
        backend.check_lengths(2, 64, 66)
    with pytest.raises(MoetrtError, match="seq 64 not in 1..1"):  # PREFILL takes 2 rows at most, DECODE one token
        backend.check_lengths(4, 64, 8)


def test_numpy_feeds_become_tensors_of_the_engines_types(tmp_path):
    import ml_dtypes
    import torch

    backend = _fake_backend(tmp_path, kv_dtype="bfloat16")
    past = np.full((1, 1, 3, CONFIG.head_dim), 1.5, dtype=ml_dtypes.bfloat16)  # as Polygraphy feeds bf16
    tensor = backend._device_tensor("past_key_values.0.key", past)
    assert tensor.dtype == torch.bfloat16 and float(tensor[0, 0, 2, 0]) == 1.5
    ids = backend._device_tensor("input_ids", np.array([[1, 2]], np.int32))
    assert ids.dtype == torch.int64 and ids.tolist() == [[1, 2]]


# --- on TensorRT ---------------------------------------------------------------------------------
def _tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


needs_trt = pytest.mark.skipif(not _tensorrt_importable(), reason="TensorRT is not installed")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (pip install moetrt[gpu])")


@pytest.fixture(scope="module")
def trt_engine(tmp_path_factory):
    from moetrt.export import onnx_from_torch
    from moetrt.optimize.trt import engine_from_onnx

    work = tmp_path_factory.mktemp("trt")
    model = moetrt.MoETransformer.from_config(CONFIG, seed=5, std=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = onnx_from_torch(model, work / "exported", progress=False)
    engine = engine_from_onnx(exported, work / "engine", precision="fp16", profile="batch=1:2:4,seq=1:16:64,past=0:32:96",
                              timing_cache=False, progress=False)
    return model, engine


@pytest.mark.trt
@needs_trt
@needs_triton
def test_kv_cache_stays_on_the_gpu(trt_engine):
    import torch

    _, engine = trt_engine
    backend = TrtBackend(engine)
    ids = np.array([[3, 1, 4, 1, 5]], np.int64)
    out = backend.forward({"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(5)[None],
                           **backend.empty_past(1)})
    present = out["present.0.key"]
    assert isinstance(present, torch.Tensor) and present.is_cuda and present.dtype == torch.float16
    assert tuple(present.shape) == (1, CONFIG.num_key_value_heads, 5, CONFIG.head_dim)
    step = {"input_ids": np.array([[9]]), "attention_mask": np.ones((1, 6), np.int64), "position_ids": np.array([[5]])}
    step.update({name.replace("present.", "past_key_values."): value for name, value in out.items() if name.startswith("present.")})
    again = backend.forward(step)
    assert again["logits"].shape == (1, 1, CONFIG.vocab_size) and again["present.1.value"].shape[2] == 6


@pytest.mark.trt
@needs_trt
@needs_triton
def test_steps_outside_the_profile_are_refused(trt_engine):
    _, engine = trt_engine
    session = Session(engine, backend="trt")
    with pytest.raises(MoetrtError, match="batch 5 not in 1..4"):
        session.generate([[1, 2]] * 5, max_new_tokens=2)


@pytest.mark.trt
@needs_trt
@needs_triton
def test_greedy_tokens_equal_the_torch_back_end(trt_engine):
    model, engine = trt_engine
    prompts = [[7, 3, 9, 2, 11, 4], [5, 6]]
    got = Session(engine, backend="trt").generate(prompts, max_new_tokens=10, stop_tokens=())
    want = Session(model, backend="torch").generate(prompts, max_new_tokens=10, stop_tokens=())
    assert got.tokens == want.tokens
