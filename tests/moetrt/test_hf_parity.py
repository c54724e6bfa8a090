"""The reference model against Hugging Face transformers, family by family, in fp32.

Each tiny variant (``tests/hf_tiny.py``) is loaded into moetrt three ways: from the in-memory
transformers model, from a ``save_pretrained`` folder (the on-disk per-expert layout) and from a
sharded folder (``model.safetensors.index.json``). Logits must agree to ``REL_TOL`` on plain
forwards, on prefill + KV-cache decode through each side's own cache, and on left-padded
batches (compared on real tokens only). The worst measured error per family prints at the end
of the run.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

import moetrt
from tests.hf_tiny import FAMILY_OF, VARIANTS, hf_forward, hf_tiny_model, left_padded, rel_err

pytest.importorskip("transformers")

# max|ours - hf| / max|hf|; both sides run the same fp32 math in a different order
REL_TOL = 1e-5

# (batch, seq) of plain forwards
FORWARD_SHAPES = [(1, 1), (1, 7), (2, 16), (3, 64)]
# (batch, prompt length, decode steps) through the KV cache
CACHE_SHAPES = [(1, 1, 4), (1, 9, 3), (3, 16, 3)]
# real-token lengths per row of a left-padded batch (padded to the longest), then decode steps
PADDED_LENGTHS = [[5, 12], [1, 16, 9], [64, 31]]
PADDED_DECODE_STEPS = 3

VARIANT_NAMES = sorted(VARIANTS)


@functools.lru_cache(maxsize=None)
def _pair(variant: str):
    hf = hf_tiny_model(variant)
    ours = moetrt.from_pretrained(hf)
    return hf, ours


def _ids(batch: int, seq: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _check(record_max, variant: str, mode: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    err = rel_err(ours, ref)
    record_max("HF parity: max |ours - hf| / max |hf| (fp32)", f"{FAMILY_OF[variant]:<10} {mode}", err)
    assert err <= REL_TOL, f"{variant} ({mode}): relative error {err:.3e} > {REL_TOL:.0e}"


@pytest.mark.parametrize("batch,seq", FORWARD_SHAPES)
@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_logits_match(variant, batch, seq, record_max):
    hf, ours = _pair(variant)
    ids = _ids(batch, seq, hf.config.vocab_size, seed=batch * 100 + seq)
    ref, _ = hf_forward(hf, ids)
    with torch.no_grad():
        out = ours(ids, use_cache=False)
    assert out.logits.shape == (batch, seq, hf.config.vocab_size)
    assert out.past_key_values is None
    _check(record_max, variant, "full forward", out.logits, ref)


@pytest.mark.parametrize("batch,prompt,steps", CACHE_SHAPES)
@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_cached_decode_matches(variant, batch, prompt, steps, record_max):
    hf, ours = _pair(variant)
    cfg = ours.config
    ids = _ids(batch, prompt + steps, hf.config.vocab_size, seed=7 * batch + prompt)
    ref, hf_cache = hf_forward(hf, ids[:, :prompt])
    with torch.no_grad():
        out = ours(ids[:, :prompt])
    _check(record_max, variant, "prefill + decode", out.logits, ref)
    cache = out.past_key_values
    for step in range(prompt, prompt + steps):
        token = ids[:, step : step + 1]  # [B, 1]
        ref, hf_cache = hf_forward(hf, token, cache=hf_cache)
        with torch.no_grad():
            out = ours(token, past_key_values=cache)
        cache = out.past_key_values
        assert len(cache) == cfg.num_hidden_layers
        for layer, state in enumerate(cache):  # what each layer carries, as the state contract says
            for entry, tensor in zip(ours.state.entries(layer), state, strict=True):
                assert tuple(tensor.shape) == ours.state.shape(layer, entry, batch, step + 1), entry.name
        _check(record_max, variant, "prefill + decode", out.logits, ref)


@pytest.mark.parametrize("lengths", PADDED_LENGTHS, ids=lambda lengths: "-".join(map(str, lengths)))
@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_left_padded_batch_matches(variant, lengths, record_max):
    """Left padding with explicit position_ids (as ``generate`` builds them), then cached decode."""
    hf, ours = _pair(variant)
    seq = max(lengths)
    ids, mask, positions = left_padded(lengths, seq, hf.config.vocab_size, seed=len(lengths))
    real = mask.bool()  # [B, S]
    ref, hf_cache = hf_forward(hf, ids, attention_mask=mask, position_ids=positions)
    with torch.no_grad():
        out = ours(ids, attention_mask=mask, position_ids=positions)
    _check(record_max, variant, "left-padded", out.logits[real], ref[real])
    cache = out.past_key_values
    next_ids = _ids(len(lengths), PADDED_DECODE_STEPS, hf.config.vocab_size, seed=99)
    for step in range(PADDED_DECODE_STEPS):
        token = next_ids[:, step : step + 1]  # [B, 1]
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)  # [B, P+1]
        positions = positions[:, -1:] + 1  # [B, 1]
        ref, hf_cache = hf_forward(hf, token, attention_mask=mask, position_ids=positions, cache=hf_cache)
        with torch.no_grad():
            out = ours(token, attention_mask=mask, position_ids=positions, past_key_values=cache)
        cache = out.past_key_values
        _check(record_max, variant, "left-padded", out.logits, ref)


def _assert_same_weights(a: moetrt.MoETransformer, b: moetrt.MoETransformer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    differ = [name for name in sa if not torch.equal(sa[name], sb[name])]
    assert not differ, f"weights differ after the round trip through disk: {differ[:5]}"


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_from_saved_folder(variant, tmp_path, record_max):
    """transformers' on-disk layout (one tensor per expert projection) loads to the same weights."""
    hf, from_memory = _pair(variant)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = moetrt.from_pretrained(tmp_path)
    assert loaded.config == from_memory.config
    _assert_same_weights(loaded, from_memory)
    ids = _ids(2, 11, hf.config.vocab_size, seed=3)
    ref, _ = hf_forward(hf, ids)
    with torch.no_grad():
        _check(record_max, variant, "full forward", loaded(ids).logits, ref)


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_from_sharded_folder(variant, tmp_path):
    hf, from_memory = _pair(variant)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    loaded = moetrt.from_pretrained(tmp_path)
    assert loaded.config == from_memory.config
    _assert_same_weights(loaded, from_memory)


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_routing_is_not_degenerate(variant):
    """The tiny models route: every MoE layer uses several experts with unequal weights."""
    hf, ours = _pair(variant)
    ids = _ids(2, 32, hf.config.vocab_size, seed=5)
    with torch.no_grad():
        out = ours(ids, output_router=True)
    assert len(out.router_indices) == len(ours.config.moe_layers) > 0
    for weights, indices in zip(out.router_weights, out.router_indices):
        assert indices.unique().numel() >= min(3, ours.config.num_experts)
        assert float(weights.max() - weights.min()) > 0.05


# RoPE scaling types, each with the parameters transformers reads (max_position_embeddings is 256)
ROPE_CASES = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32},
    "yarn-deepseek": {"rope_type": "yarn", "factor": 4.0, "mscale": 0.707, "mscale_all_dim": 0.707,
                      "original_max_position_embeddings": 64, "beta_fast": 16.0, "beta_slow": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_scaled_rope_matches_transformers(case, tmp_path, record_max):
    """A Mixtral with scaled RoPE, read from its saved folder, on positions past the original window."""
    # head_dim explicit: transformers' dynamic init reads config.head_dim, which MixtralConfig leaves None
    hf = hf_tiny_model("mixtral", head_dim=16, rope_parameters={**ROPE_CASES[case], "rope_theta": 10000.0})
    hf.save_pretrained(tmp_path / "ckpt")
    ours = moetrt.from_pretrained(tmp_path / "ckpt")
    assert ours.config.rope_scaling["rope_type"] == ROPE_CASES[case]["rope_type"]
    ids = torch.randint(0, 96, (2, 80), generator=torch.Generator().manual_seed(3))
    ref, _ = hf_forward(hf, ids)
    with torch.no_grad():
        err = rel_err(ours(ids).logits, ref)
    record_max("HF parity: max |ours - hf| / max |hf| (fp32)", f"rope {case}", err)
    assert err <= 1e-5
    if case != "dynamic":  # dynamic NTK only acts past max_position_embeddings, which moetrt refuses
        plain = moetrt.MoETransformer(dataclasses.replace(ours.config, rope_scaling=None))
        plain.load_state_dict(ours.state_dict())
        with torch.no_grad():
            assert rel_err(plain.eval()(ids).logits, ref) > 1e-3  # the scaling is really applied
