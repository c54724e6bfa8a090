"""Session: what it loads from where, and the errors a user meets (each says how to fix it)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from moetrt.errors import BackendMissingError, CheckpointError, MoetrtError
from moetrt.runtime import Backend, Session

PROMPTS = ["once upon a time", "the cat sat on the mat", "dog"]


def copy_export(src, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


# --- loading -------------------------------------------------------------------------------------
def test_ort_session_reads_the_exported_folder(text_export):
    session = Session(text_export, backend="ort")
    assert isinstance(session.backend, Backend)
    assert session.spec.router_outputs and session.spec.kv_dtype == "float32"
    assert session.tokenizer is not None and session.stop_tokens == (2,)
    assert session.encode("the cat") == [10, 11]


def test_torch_session_from_an_exported_folder_rebuilds_its_source(text_export):
    from_export = Session(text_export, backend="torch").generate(PROMPTS, max_new_tokens=12)
    ort = Session(text_export, backend="ort").generate(PROMPTS, max_new_tokens=12)
    assert from_export.tokens == ort.tokens and from_export.texts == ort.texts


def test_torch_session_from_an_export_of_an_in_memory_model_says_what_to_pass(hf_model_export):
    with pytest.raises(CheckpointError, match="pass that checkpoint folder"):
        Session(hf_model_export, backend="torch")


def test_torch_session_from_an_export_whose_source_moved(text_export, tmp_path):
    folder = copy_export(text_export, tmp_path)
    meta = json.loads((folder / "moetrt.json").read_text())
    meta["source"] = str(tmp_path / "gone")
    (folder / "moetrt.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not found here"):
        Session(folder, backend="torch")
    Session(folder, backend="ort")  # the ONNX model itself is complete


# --- errors --------------------------------------------------------------------------------------
def test_missing_folder_names_the_presets(tmp_path):
    with pytest.raises(CheckpointError, match="neither an existing folder nor a preset"):
        Session(tmp_path / "nope", backend="ort")


@pytest.mark.parametrize("missing", ["model.onnx", "tokenizer.json"])
def test_exported_folder_missing_a_file_names_it(missing, text_export, tmp_path):
    folder = copy_export(text_export, tmp_path)
    (folder / missing).unlink()
    with pytest.raises(CheckpointError, match=f"missing {missing}"):
        Session(folder, backend="ort")


def test_corrupt_metadata_says_to_re_export(text_export, tmp_path):
    folder = copy_export(text_export, tmp_path)
    (folder / "moetrt.json").write_text("{not json")
    with pytest.raises(MoetrtError, match="re-export"):
        Session(folder, backend="ort")


def test_newer_format_version_says_which_it_reads(text_export, tmp_path):
    folder = copy_export(text_export, tmp_path)
    meta = json.loads((folder / "moetrt.json").read_text())
    meta["format_version"] = 99
    (folder / "moetrt.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="reads version 1"):
        Session(folder, backend="ort")


def test_onnx_without_metadata_says_what_is_missing(text_export, tmp_path):
    folder = copy_export(text_export, tmp_path)
    (folder / "moetrt.json").unlink()
    with pytest.raises(MoetrtError, match="no moetrt.json"):
        Session(folder, backend="ort")


def test_ort_on_a_checkpoint_says_to_export_first(text_checkpoint):
    with pytest.raises(MoetrtError, match="export it first"):
        Session(text_checkpoint, backend="ort")


def test_unknown_backend_lists_the_choices(text_checkpoint):
    with pytest.raises(MoetrtError, match="torch, ort, trt"):
        Session(text_checkpoint, backend="tensorflow")


def test_onnxruntime_not_installed_names_the_package(text_export, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    with pytest.raises(BackendMissingError, match="pip install onnxruntime$"):
        Session(text_export, backend="ort")
    with pytest.raises(BackendMissingError, match="pip install onnxruntime-gpu"):
        Session(text_export, backend="ort", device="cuda")


def test_tensorrt_back_end_is_announced_not_silent(text_export, monkeypatch):
    """An exported folder is no engine, whatever TensorRT package is installed: the folder is checked first."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MoetrtError, match="not a TensorRT engine; build an engine from it first .*--target trt"):
        Session(text_export, backend="trt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(text_checkpoint, text_export):
    with pytest.raises(MoetrtError, match="sees no CUDA GPU"):
        Session(text_checkpoint, device="cuda")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(BackendMissingError, match="onnxruntime-gpu"):
            Session(text_export, backend="ort", device="cuda")


def test_dtype_is_fixed_by_the_export(text_export):
    with pytest.raises(MoetrtError, match="fixed by the export"):
        Session(text_export, backend="ort", dtype="fp16")


def test_text_prompt_for_a_model_without_tokenizer(hf_model_export):
    session = Session(hf_model_export, backend="ort")
    with pytest.raises(MoetrtError, match="pass token ids"):
        session.generate("hello")


def test_mixed_prompts_are_rejected(text_checkpoint):
    with pytest.raises(MoetrtError, match="not mixed"):
        Session(text_checkpoint).generate(["the cat", [3, 4]])


def test_token_ids_as_transformers_users_hold_them(text_checkpoint):
    """Tensors and arrays [T] / [B, T], and a tokenizer's BatchEncoding (its mask drops the padding)."""
    import numpy as np
    from transformers import PreTrainedTokenizerFast

    session = Session(text_checkpoint)
    rows = [session.encode(p) for p in PROMPTS]
    expected = session.generate(rows, max_new_tokens=6, stop_tokens=()).tokens
    width = max(map(len, rows))
    padded = [[0] * (width - len(r)) + r for r in rows]  # left padding, as for generation
    mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    ok = lambda prompts: session.generate(prompts, max_new_tokens=6, stop_tokens=()).tokens  # noqa: E731
    assert ok(torch.tensor(rows[1])) == expected[1:2]
    assert ok(np.array(rows[1], dtype=np.int32)) == expected[1:2]
    assert ok(torch.tensor(rows[1])[None]) == expected[1:2]
    assert ok({"input_ids": torch.tensor(padded), "attention_mask": torch.tensor(mask)}) == expected
    assert ok({"input_ids": np.array(padded), "attention_mask": np.array(mask)}) == expected

    tok = PreTrainedTokenizerFast(tokenizer_file=str(text_checkpoint / "tokenizer.json"), padding_side="left")
    tok.pad_token_id = session.pad_token_id
    encoding = tok(PROMPTS, return_tensors="pt", padding=True)
    assert [[int(t) for t, m in zip(r, k) if m] for r, k in zip(encoding["input_ids"], encoding["attention_mask"])] == rows
    assert ok(encoding) == expected

    with pytest.raises(MoetrtError, match="must be integers"):
        session.generate(torch.rand(1, 3))
    with pytest.raises(MoetrtError, match=r"\[T\] or \[batch, T\]"):
        session.generate(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(MoetrtError, match="attention_mask has shape"):
        session.generate({"input_ids": torch.tensor(padded), "attention_mask": torch.tensor(mask)[:, 1:]})


@pytest.mark.parametrize("module,cls", [
    ("moetrt.runtime.backend_torch", "TorchBackend"),
    ("moetrt.runtime.backend_ort", "OrtBackend"),
    ("moetrt.runtime.backend_trt", "TrtBackend"),
])
def test_every_back_end_has_the_interface_methods(module, cls):
    import importlib
    import inspect

    backend_cls = getattr(importlib.import_module(module), cls)
    for method in ("forward", "empty_past"):
        assert inspect.signature(getattr(backend_cls, method)) == inspect.signature(getattr(Backend, method))
    assert backend_cls.name == cls[: -len("Backend")].lower()


def test_checksums_catch_a_changed_file(text_export, tmp_path):
    from moetrt.runtime.model_folder import read_exported

    folder = copy_export(text_export, tmp_path)
    read_exported(folder).verify_checksums()
    (folder / "tokenizer.json").write_text((folder / "tokenizer.json").read_text() + " ")
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        read_exported(folder).verify_checksums()
