"""``--profile`` strings -> optimization profiles -> per-input (min, opt, max) shapes."""

from __future__ import annotations

import pytest

import moetrt
from moetrt.errors import MoetrtError
from moetrt.export import io_spec
from moetrt.optimize.trt import DEFAULT_PROFILE, AxisRange, ProfileSpec, parse_profile, parse_profiles

# (text, max_positions, expected batch, seq, past as (min, opt, max))
VALID = [
    (DEFAULT_PROFILE, None, (1, 4, 8), (1, 512, 4096), (0, 1024, 4096)),
    ("batch=2,seq=1:128,past=0:16:64", None, (2, 2, 2), (1, 128, 128), (0, 16, 64)),
    (" Batch_Size = 1:1:4 , sequence_length=1:8:8 ", None, (1, 1, 4), (1, 8, 8), (0, 1024, 4096)),
    ("seq=1:64:256", 512, (1, 4, 8), (1, 64, 256), (0, 511, 511)),  # defaults are cut to the model's positions
    (None, 128, (1, 4, 8), (1, 128, 128), (0, 127, 127)),
    ("", None, (1, 4, 8), (1, 512, 4096), (0, 1024, 4096)),
    ("past=0", 64, (1, 4, 8), (1, 64, 64), (0, 0, 0)),
]
# (text, max_positions, words of the error)
INVALID = [
    ("batch=8:4:16", None, "MIN <= OPT <= MAX"),
    ("batch=0:1:4", None, "at least 1"),
    ("seq=0:1:4", None, "at least 1"),
    ("past=-1:0:4", None, "at least 0"),
    ("beam=1:2:3", None, "AXIS one of batch, seq, past"),
    ("batch:1:2:3", None, "AXIS=MIN:OPT:MAX"),
    ("batch=1:2:3:4", None, "3 numbers at most"),
    ("batch=a:b", None, "whole numbers"),
    ("batch=1,batch=2", None, "given twice"),
    ("seq=1:64:1024", 512, "max_position_embeddings (512)"),
    ("past=0:64:512", 512, "past can be at most 511"),
]


@pytest.mark.parametrize("text,max_positions,batch,seq,past", VALID)
def test_valid_profiles(text, max_positions, batch, seq, past):
    spec = parse_profile(text, max_positions)
    assert (tuple(spec.batch), tuple(spec.seq), tuple(spec.past)) == (batch, seq, past)
    assert tuple(spec.total) == tuple(s + p for s, p in zip(seq, past))
    assert parse_profile(str(spec)) == spec  # str() is a profile string again
    assert ProfileSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("text,max_positions,words", INVALID)
def test_invalid_profiles_say_what_to_write(text, max_positions, words):
    with pytest.raises(MoetrtError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_profile(text, max_positions)


def test_several_profiles():
    decode, prefill = parse_profiles("batch=1:4:8,seq=1:1:1,past=0:256:512; batch=1:1:2,seq=1:256:512,past=0", 1024)
    assert tuple(decode.seq) == (1, 1, 1) and tuple(prefill.past) == (0, 0, 0)
    assert len(parse_profiles(None)) == 1 and parse_profiles(None)[0] == parse_profile(DEFAULT_PROFILE)


def test_shapes_follow_the_exported_axes():
    cfg = moetrt.MoEConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, intermediate_size=24)
    inputs = io_spec(cfg, "fp16").to_dict()["inputs"]
    shapes = parse_profile("batch=1:2:4,seq=1:16:64,past=0:32:128").shapes(inputs)
    assert set(shapes) == {t["name"] for t in inputs}
    assert shapes["input_ids"] == ((1, 1), (2, 16), (4, 64)) == shapes["position_ids"]
    assert shapes["attention_mask"] == ((1, 1), (2, 48), (4, 192))  # total = past + seq
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        assert shapes[f"past_key_values.{i}.value"] == ((1, 1, 0, head_dim), (2, 1, 32, head_dim), (4, 1, 128, head_dim))


def test_unknown_dynamic_axis_is_an_error():
    with pytest.raises(MoetrtError, match="num_beams"):
        parse_profile().shapes([{"name": "x", "shape": ["num_beams", 4]}])


def test_axis_range_containment():
    r = AxisRange(1, 4, 8)
    assert 1 in r and 8 in r and 0 not in r and 9 not in r
