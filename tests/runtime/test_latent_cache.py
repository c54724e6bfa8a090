"""Sessions on models with multi-head latent attention: the cache is each layer's state-contract entries
``latent`` [B, P, kv_lora_rank] and ``rope_key`` [B, P, qk_rope_head_dim] (moetrt.state), not key/value.

Each back end (ort on the export, torch on the model, torch with its static cache) runs a left-padded
prefill and two decode steps feeding its own presents back; the logits must equal the reference model's
run with its own dynamic cache, and the presents must carry the contract's names and shapes.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import moetrt
from moetrt.parity import check_close, tolerance
from moetrt.runtime import Session
from moetrt.runtime.backend_torch import TorchBackend

pytest.importorskip("transformers")

# DeepSeek-V3 (q low-rank, groups, a dense first layer, YaRN) and GLM-4.7-Flash (glm4_moe_lite)
VARIANTS = ["deepseek_v3", "glm4_moe_lite"]
# (session backend, options): the export on ONNX Runtime, the model on torch, the torch static cache
BACKENDS = [("ort", {}), ("torch", {}), ("torch", {"static_cache": True})]
BATCH, PROMPT, STEPS = 2, 7, 2


@pytest.fixture(scope="module")
def latent_model(tmp_path_factory):
    """variant -> (fp32 MoETransformer, its canonical export), built once per module."""
    from moetrt.export import onnx_from_torch
    from tests.hf_tiny import hf_tiny_model

    cache = {}

    def get(variant):
        if variant not in cache:
            model = moetrt.from_pretrained(hf_tiny_model(variant))
            folder = onnx_from_torch(model, tmp_path_factory.mktemp(f"latent-{variant}") / "onnx", progress=False)
            cache[variant] = model, folder
        return cache[variant]

    return get


@pytest.fixture
def small_steps(monkeypatch):
    """The static cache grows in steps of 4 positions, so the decode steps below grow it."""
    monkeypatch.setattr(sys.modules[TorchBackend.__module__], "CAPACITY_STEP", 4)


def _steps(model, seed=0):
    """Feeds of a left-padded prefill and STEPS decode steps (no past), and the reference logits of each."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.vocab_size, (BATCH, PROMPT + STEPS), generator=gen)
    mask = torch.ones(BATCH, PROMPT + STEPS, dtype=torch.long)
    mask[1, :3] = 0  # row 1 left-padded
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    bounds = [(0, PROMPT)] + [(PROMPT + s, PROMPT + s + 1) for s in range(STEPS)]
    feeds, expected, past = [], [], None
    with torch.no_grad():
        for start, end in bounds:
            out = model(ids[:, start:end], mask[:, :end], positions[:, start:end], past)
            past = out.past_key_values
            feeds.append({"input_ids": ids[:, start:end].numpy(), "attention_mask": mask[:, :end].numpy(),
                          "position_ids": positions[:, start:end].numpy()})
            expected.append((out.logits.numpy(), [tuple(t.numpy() for t in layer) for layer in past]))
    return feeds, expected, mask.numpy().astype(bool)


def _shape(value) -> tuple[int, ...]:
    """A back end's native array's shape (an OrtValue's ``shape`` is a method)."""
    return tuple(value.shape() if callable(value.shape) else value.shape)


def _numpy(value):
    if isinstance(value, torch.Tensor):
        return value.float().cpu().numpy()
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


@pytest.mark.parametrize("backend,options", BACKENDS, ids=["ort", "torch", "torch-static"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_session_carries_the_latent_cache_through_prefill_and_decode(latent_model, small_steps, variant, backend,
                                                                     options):
    model, folder = latent_model(variant)
    session = Session(folder if backend == "ort" else model, backend=backend, **options)
    cfg, state = model.config, session.spec.state
    assert state == model.state
    assert state.all_past_names()[:2] == ["past_key_values.0.latent", "past_key_values.0.rope_key"]
    feeds, expected, real = _steps(model)
    past = session.backend.empty_past(BATCH)
    assert {name: _shape(v) for name, v in past.items()} == state.empty_past(BATCH)
    for n, (feed, (logits, presents)) in enumerate(zip(feeds, expected)):
        out = session.forward({**feed, **past})
        seq, total = feed["input_ids"].shape[1], feed["attention_mask"].shape[1]
        rows = real[:, total - seq:total]  # padded positions compute arbitrary values: compared on real tokens
        close = check_close(out["logits"][rows], logits[rows], tolerance("fp32", "logits"))
        assert close.ok, f"step {n}: {close}"
        for i in range(cfg.num_hidden_layers):
            for name, want in zip(state.present_names(i), presents[i], strict=True):
                got = _numpy(out[name])
                assert got.shape == (BATCH, total, state.size_map[state.entry_of(name)[1].dims[-1]]), name
                # padded positions are masked: only real ones are compared (the past grows along axis 1)
                valid = real[:, :total]
                assert check_close(got[valid], want[valid], tolerance("fp32", "kv")).ok, f"step {n}: {name}"
        past = {past_name: out[present] for present, past_name in state.pairs()}
    if options.get("static_cache"):
        buffers = session.backend._cache.layer(0)
        assert [tuple(b.shape)[::2] for b in buffers] == [(BATCH, cfg.kv_lora_rank), (BATCH, cfg.qk_rope_head_dim)]
        assert session.backend._cache.capacity >= PROMPT + STEPS


def test_static_cache_generates_the_dynamic_cache_tokens(latent_model, small_steps):
    model, _ = latent_model("deepseek_v3")
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    static = Session(model, backend="torch", static_cache=True).generate(prompts, max_new_tokens=10, stop_tokens=())
    dynamic = Session(model, backend="torch").generate(prompts, max_new_tokens=10, stop_tokens=())
    assert static.tokens == dynamic.tokens
