"""Exported folders and the state contract they record (``io.state`` of moetrt.json)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from moetrt.errors import CheckpointError
from moetrt.runtime.model_folder import read_exported
from moetrt.state import StateContract, state_contract


def _rewrite_state(src, dst, state):
    shutil.copytree(src, dst)
    meta = json.loads((dst / "moetrt.json").read_text())
    if state is None:
        del meta["io"]["state"]
    else:
        meta["io"]["state"] = state
    (dst / "moetrt.json").write_text(json.dumps(meta))
    return dst


def test_export_records_the_state_contract(hf_model_export):
    exported = read_exported(hf_model_export)
    assert exported.meta["io"]["state"] == state_contract(exported.config).to_dict()
    assert exported.state == state_contract(exported.config)


def test_a_folder_written_before_the_contract_still_runs(hf_model_export, tmp_path):
    pytest.importorskip("onnxruntime")
    from moetrt.runtime.backend_ort import OrtBackend

    old = _rewrite_state(hf_model_export, tmp_path / "old", None)
    assert read_exported(old).state == StateContract.read({}, read_exported(old).config)
    prompt = {"input_ids": np.array([[3, 5, 7]]), "attention_mask": np.ones((1, 3), np.int64),
              "position_ids": np.arange(3)[None]}
    outputs = []
    for folder in (hf_model_export, old):
        backend = OrtBackend(folder)
        outputs.append(backend.forward(prompt | backend.empty_past(1)))
    assert np.array_equal(outputs[0]["logits"], outputs[1]["logits"])  # the same graph, the same feeds
    assert sorted(outputs[0]) == sorted(outputs[1])


@pytest.mark.parametrize(("state", "message"), [
    ({"entries": [], "layers": [["key"]], "sizes": {}}, "does not declare"),
    ({"entries": [{"name": "key", "dims": ["heads"]}], "layers": [], "sizes": {}}, "must start with 'batch'"),
    ({"entries": [{"name": "key", "dims": ["batch", "past"]}], "layers": [["key"]], "sizes": {}}, "describes 1 layers"),
])
def test_a_broken_state_contract_says_re_export(hf_model_export, tmp_path, state, message):
    broken = _rewrite_state(hf_model_export, tmp_path / "broken", state)
    with pytest.raises(CheckpointError, match=f"{message}.*re-export the model"):
        read_exported(broken)
