"""The torch back end's static KV cache (the path CUDA graphs replay), checked on the CPU.

On CUDA the back end writes keys/values in place into a :class:`StaticKVCache` and replays a
captured graph per decode step; the capture itself needs a GPU (tests/moetrt/kernels/
test_kernels_gpu.py), but everything the graph replays is the eager static path tested here
against the dynamic cache: same tokens, same logits, same router outputs, across capacity
growth and with a past that came from another back end.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import moetrt
from moetrt.errors import MoetrtError
from moetrt.model import StaticKVCache
from moetrt.runtime.backend import present_names
from moetrt.runtime.backend_torch import TorchBackend
from moetrt.runtime.generate import Generation, SamplingOptions

# (prompts, max_new_tokens, temperature): left padding, batch 1, sampling
CASES = [
    ([[5, 6, 7, 8, 9], [10, 11]], 12, 0.0),
    ([[3]], 9, 0.0),
    ([[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]], 7, 0.9),
]


@pytest.fixture(scope="module")
def model():
    return moetrt.from_pretrained("tiny")


@pytest.fixture
def small_steps(monkeypatch):
    """Capacity grows in steps of 4 positions, so a short generation grows the cache several times."""
    monkeypatch.setattr(sys.modules[TorchBackend.__module__], "CAPACITY_STEP", 4)


def _generate(backend, prompts, new, temperature, stats=False):
    options = SamplingOptions(max_new_tokens=new, temperature=temperature, seed=7 if temperature else None)
    return Generation(backend, prompts, options, expert_stats=stats).run()


@pytest.mark.parametrize("prompts, new, temperature", CASES)
def test_static_cache_generates_the_dynamic_cache_tokens(model, small_steps, prompts, new, temperature):
    static = TorchBackend(model, static_cache=True)
    got = _generate(static, prompts, new, temperature, stats=True)
    ref = _generate(TorchBackend(model), prompts, new, temperature, stats=True)
    assert got.tokens == ref.tokens
    assert static._cache.capacity >= max(map(len, prompts)) + new - 1
    np.testing.assert_array_equal(got.stats.counts, ref.stats.counts)


def test_static_step_logits_and_presents_match_the_dynamic_step(model, small_steps):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, model.config.vocab_size, size=(2, 6))
    mask = np.ones((2, 6), dtype=np.int64)
    mask[1, :2] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": np.where(mask == 1, mask.cumsum(1) - 1, 1)}
    dynamic, static = TorchBackend(model), TorchBackend(model, static_cache=True)
    out_d = dynamic.forward({**feeds, **dynamic.empty_past(2)})
    out_s = static.forward({**feeds, **static.empty_past(2)})
    real = mask.astype(bool)
    np.testing.assert_allclose(out_s["logits"][real], out_d["logits"][real], rtol=0, atol=1e-5)
    for name in present_names(0):
        assert tuple(out_s[name].shape) == tuple(out_d[name].shape) == (2, model.config.num_key_value_heads, 6, model.config.head_dim)
        torch.testing.assert_close(out_s[name], out_d[name], rtol=0, atol=0)

    # one decode step: the static back end threads its own presents (no copy), the dynamic its own
    step = {
        "input_ids": out_d["logits"][:, -1].argmax(-1)[:, None],
        "attention_mask": np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], 1),
        "position_ids": mask.sum(1, keepdims=True),
    }
    n = model.config.num_hidden_layers
    past = lambda out: {f"past_key_values.{i}.{kv}": out[f"present.{i}.{kv}"] for i in range(n) for kv in ("key", "value")}  # noqa: E731
    next_d = dynamic.forward({**step, **past(out_d)})
    next_s = static.forward({**step, **past(out_s)})
    np.testing.assert_allclose(next_s["logits"], next_d["logits"], rtol=0, atol=1e-5)

    # a past from another back end is copied into the static cache
    fresh = TorchBackend(model, static_cache=True)
    next_f = fresh.forward({**step, **past(out_d)})
    np.testing.assert_allclose(next_f["logits"], next_d["logits"], rtol=0, atol=1e-5)


def test_static_cache_grows_without_losing_positions(model, small_steps):
    backend = TorchBackend(model, static_cache=True)
    result = _generate(backend, [[9, 8, 7]], 14, 0.0)
    assert backend._cache.capacity >= 16  # 3 + 14 - 1 positions written; grew 4 -> 8 -> 16
    assert result.tokens == _generate(TorchBackend(model), [[9, 8, 7]], 14, 0.0).tokens


def test_cuda_graphs_need_cuda_and_a_static_cache(model):
    with pytest.raises(MoetrtError, match="needs device='cuda'"):
        TorchBackend(model, device="cpu", cuda_graphs=True)
    with pytest.raises(MoetrtError, match="needs static_cache=True"):
        TorchBackend(model, device="cpu", static_cache=False, cuda_graphs=True)
    assert not TorchBackend(model).static_cache  # the CPU default keeps the dynamic cache


def test_static_kv_cache_checks_its_arguments(model):
    cfg = model.config
    with pytest.raises(MoetrtError, match="max_position_embeddings"):
        StaticKVCache(cfg, 1, cfg.max_position_embeddings + 1, torch.float32, "cpu")
    cache = StaticKVCache(cfg, 2, 8, torch.float32, "cpu")
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(MoetrtError, match="batch 2"):
        model(ids, static_cache=cache, cache_position=torch.arange(3))
    with pytest.raises(MoetrtError, match="needs cache_position"):
        model(ids.expand(2, 3), static_cache=cache)
    with pytest.raises(MoetrtError, match="cache_position must lie in 0..7"):
        model(ids.expand(2, 3), static_cache=cache, cache_position=torch.arange(6, 9))
    with pytest.raises(MoetrtError, match=r"\[batch, capacity\] = \[2, 8\]"):
        model(ids.expand(2, 3), attention_mask=torch.ones(2, 3, dtype=torch.long), static_cache=cache,
              cache_position=torch.arange(3))  # fmt: skip
