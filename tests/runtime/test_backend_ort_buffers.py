"""The ort back end writes the KV cache into two buffers per present output, in turn, grown by doubling."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from moetrt.runtime.backend_ort import OrtBackend
from moetrt.runtime.backend_torch import TorchBackend
from moetrt.runtime.generate import Generation, SamplingOptions

pytest.importorskip("onnxruntime")


@pytest.fixture
def small_steps(monkeypatch):
    """Buffers grow in steps of 4 positions, so a short generation grows them several times."""
    monkeypatch.setattr(sys.modules[OrtBackend.__module__], "KV_POSITION_STEP", 4)


def test_generation_across_buffer_growth_matches_the_torch_back_end(small_steps, text_checkpoint, text_export):
    ort = OrtBackend(text_export)
    prompts, options = [[5, 6, 7], [8, 9, 10, 11, 12]], SamplingOptions(max_new_tokens=20)
    got = Generation(ort, prompts, options).run().tokens
    assert got == Generation(TorchBackend.load(text_checkpoint), prompts, options).run().tokens
    spec = ort.spec
    positions = 5 + 20 - 1  # the longest row's prompt + the tokens fed back
    assert ort._kv_positions == 32 >= positions  # 8 -> 16 -> 32 positions, doubling
    per_buffer = 2 * spec.num_kv_heads * spec.head_dim * 32 * 4  # [B, G, C, Hd] float32
    assert ort.kv_buffer_bytes == 2 * 2 * spec.num_layers * per_buffer  # two buffers per key and value


def test_presents_alternate_between_two_buffers_and_never_alias_the_past(text_export):
    ort = OrtBackend(text_export)
    mask = np.ones((1, 3), dtype=np.int64)
    feeds = {"input_ids": np.array([[4, 5, 6]]), "attention_mask": mask, "position_ids": np.arange(3)[None]}
    pointers = []
    for step in range(4):
        out = ort.forward({**feeds, **(ort.empty_past(1) if step == 0 else past)})
        key = out["present.0.key"]
        pointers.append(key.data_ptr())
        assert key.shape() == [1, ort.spec.num_kv_heads, 3 + step, ort.spec.head_dim]
        past = {f"past_key_values.{i}.{kv}": out[f"present.{i}.{kv}"]
                for i in range(ort.spec.num_layers) for kv in ("key", "value")}  # fmt: skip
        mask = np.ones((1, 4 + step), dtype=np.int64)
        feeds = {"input_ids": out["logits"][:, -1].argmax(-1)[:, None], "attention_mask": mask,
                 "position_ids": np.array([[3 + step]])}  # fmt: skip
    assert pointers[0] == pointers[2] != pointers[1] == pointers[3]


def test_steps_with_and_without_router_outputs_interleave_on_one_back_end(text_export):
    """The back end binds its outputs anew every step: a step that asked for router outputs leaves none behind."""
    ort, fresh = OrtBackend(text_export), OrtBackend(text_export)
    feeds = {"input_ids": np.array([[4, 5, 6]]), "attention_mask": np.ones((1, 3), dtype=np.int64),
             "position_ids": np.arange(3)[None]}
    routed = ort.forward({**feeds, **ort.empty_past(1)}, want_router=True)
    assert {f"router_weights.{i}" for i in ort.spec.moe_layers} <= set(routed)
    plain = ort.forward({**feeds, **ort.empty_past(1)})
    assert not any(name.startswith("router_") for name in plain)
    want = fresh.forward({**feeds, **fresh.empty_past(1)})
    np.testing.assert_array_equal(plain["logits"], want["logits"])
    np.testing.assert_array_equal(routed["logits"], want["logits"])
    np.testing.assert_array_equal(plain["present.0.key"].numpy(), want["present.0.key"].numpy())
