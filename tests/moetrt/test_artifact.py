"""The one artifact writer (moetrt/artifact.py): tokenizer files, checksums and moetrt.json together."""

from __future__ import annotations

import hashlib
import json

import pytest

from moetrt.artifact import METADATA_FILE, atomic_output_dir, check_artifact_files, write_artifact
from moetrt.errors import CheckpointError


def test_write_artifact_copies_tokenizer_files_and_lists_every_checksum(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "tokenizer.json").write_text('{"model": {}}')
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "model.onnx").write_bytes(b"graph")
        written = write_artifact(tmp, {"format": "moetrt-onnx", "files": {"stale": "0"}, "tokenizer_files": ["x"]},
                                 tokenizer_from=source, tokenizer_files=("tokenizer.json", "tokenizer_config.json"))
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta == written
    assert meta["tokenizer_files"] == ["tokenizer.json"]  # only the files the source has
    assert meta["files"] == {
        "model.onnx": hashlib.sha256(b"graph").hexdigest(),
        "tokenizer.json": hashlib.sha256(b'{"model": {}}').hexdigest(),
    }
    check_artifact_files(out, checksums=True)
    (out / "model.onnx").write_bytes(b"changed")
    with pytest.raises(CheckpointError, match="model.onnx"):
        check_artifact_files(out, checksums=True)


def test_write_artifact_without_a_tokenizer_source(tmp_path):
    written = write_artifact(tmp_path, {"format": "moetrt-onnx"}, tokenizer_files=("tokenizer.json",))
    assert written["tokenizer_files"] == [] and written["files"] == {}
