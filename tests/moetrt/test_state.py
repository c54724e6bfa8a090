"""The per-layer state contract (moetrt/state.py): names, shapes, dtypes, moetrt.json round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import moetrt
from moetrt.export.io_spec import io_spec
from moetrt.model import StaticKVCache
from moetrt.runtime.backend import ModelSpec, numpy_empty_past, past_names, present_names
from moetrt.state import KEY, VALUE, StateContract, StateEntry, past_name, present_name, state_contract

CONFIG = moetrt.MoEConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, intermediate_size=24,
                          max_position_embeddings=128)
G, HD = CONFIG.num_key_value_heads, CONFIG.head_dim

# entries later families add, declared here to show each is one StateEntry (shapes as DESIGN.md gives them)
LATENT = StateEntry("latent", ("batch", "past", 12))  # MLA compressed latent [B, P, kv_lora_rank]
ROPE_KEY = StateEntry("rope_key", ("batch", "past", 4))  # MLA rope key [B, P, rope_dim]
RECURRENT = StateEntry("recurrent", ("batch", 3, 5, 6), dtype="fp32")  # linear attention [B, H, Dk, Dv]

# (layers, batch, past) -> shapes of layer 0's entries
SHAPES = [
    ((KEY, VALUE), 2, 7, [(2, G, 7, HD), (2, G, 7, HD)]),
    ((LATENT, ROPE_KEY), 1, 5, [(1, 5, 12), (1, 5, 4)]),
    ((RECURRENT,), 3, 9, [(3, 3, 5, 6)]),
]


def test_names_are_the_onnxruntime_genai_ones():
    assert past_name(4, KEY) == past_name(4, "key") == "past_key_values.4.key"
    assert present_name(0, VALUE) == "present.0.value"
    assert past_names(2) == ("past_key_values.2.key", "past_key_values.2.value")
    assert present_names(2) == ("present.2.key", "present.2.value")


def test_io_spec_keeps_the_graph_order_and_records_the_state():
    spec = io_spec(CONFIG, "fp16")
    pasts = [n for n in spec.input_names if n.startswith("past_")]
    assert pasts == [f"past_key_values.{i}.{k}" for i in range(3) for k in ("key", "value")]
    assert spec.output_names[1:] == [f"present.{i}.{k}" for i in range(3) for k in ("key", "value")]
    key = next(t for t in spec.inputs if t.name == "past_key_values.1.key")
    assert key.dtype == "float16" and key.shape == ("batch_size", G, "past_sequence_length", HD)
    present = next(t for t in spec.outputs if t.name == "present.1.value")
    assert present.shape == ("batch_size", G, "total_sequence_length", HD)
    recorded = json.loads(json.dumps(spec.to_dict()))["state"]
    assert StateContract.from_dict(recorded) == state_contract(CONFIG)


@pytest.mark.parametrize(("entries", "batch", "past", "shapes"), SHAPES)
def test_shapes_and_past_length(entries, batch, past, shapes):
    state = StateContract(layers=(entries, entries), sizes=(("head_dim", HD), ("kv_heads", G)))
    assert [state.shape(0, e, batch, past) for e in entries] == shapes
    empty = state.empty_past(batch)
    assert list(empty) == state.all_past_names()
    for e in entries:
        got = empty[past_name(1, e)]
        assert got[e.concat_axis] == 0 if e.grows else got == e.shape(state.size_map, batch, past)
    grows = any(e.grows for e in entries)
    assert state.past_length(state.shapes(batch, past)) == (past if grows else 0)
    assert StateContract.from_dict(json.loads(json.dumps(state.to_dict()))) == state


def test_fixed_size_state_has_no_concat_axis_and_keeps_its_dtype_rule():
    assert RECURRENT.concat_axis is None and not RECURRENT.grows
    assert RECURRENT.element_dtype("bf16") == "fp32"
    assert KEY.concat_axis == 2 and KEY.element_dtype("bf16") == "bf16"


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"name": "", "dims": ("batch",)}, "name"),
    ({"name": "key", "dims": ("kv_heads", "past")}, "start with 'batch'"),
    ({"name": "key", "dims": ("batch", "past", "past")}, "once"),
    ({"name": "key", "dims": ("batch", "heads")}, "kv_heads, head_dim"),
    ({"name": "key", "dims": ("batch",), "dtype": "fp16"}, "model, fp32"),
])
def test_bad_entries_say_what_is_allowed(kwargs, field):
    with pytest.raises(ValueError, match=field):
        StateEntry(**kwargs)


def test_read_falls_back_to_key_value_for_older_folders():
    assert StateContract.read({"io": {"inputs": [], "outputs": []}}, CONFIG) == state_contract(CONFIG)
    assert StateContract.read({}, CONFIG) == StateContract.key_value(3, G, HD)
    custom = StateContract(layers=((LATENT, ROPE_KEY),) * 3, sizes=(("head_dim", HD), ("kv_heads", G)))
    assert StateContract.read({"io": {"state": custom.to_dict()}}, CONFIG) == custom
    broken = custom.to_dict() | {"layers": [["latent", "missing"]]}
    with pytest.raises(ValueError, match="'missing'"):
        StateContract.from_dict(broken)


def test_model_spec_reads_the_contract():
    custom = StateContract(layers=((LATENT, RECURRENT),) * 3, sizes=(("head_dim", HD), ("kv_heads", G)))
    spec = ModelSpec.from_config(CONFIG, "bfloat16", router_outputs=False, state=custom)
    assert spec.input_names[3:] == [f"past_key_values.{i}.{n}" for i in range(3) for n in ("latent", "recurrent")]
    assert spec.state_shape("present.2.latent", 2, 6) == (2, 6, 12)
    assert custom.entry_of("past_key_values.1.recurrent") == (1, RECURRENT)
    with pytest.raises(ValueError, match="'logits' is no state input or output"):
        custom.entry_of("logits")
    empty = numpy_empty_past(spec, 2)
    assert empty["past_key_values.0.latent"].shape == (2, 0, 12)
    assert empty["past_key_values.0.latent"].dtype.name == "bfloat16"
    assert empty["past_key_values.0.recurrent"].dtype == np.float32  # the fp32 rule holds in a bf16 model
    legacy = ModelSpec.from_config(CONFIG, "float32", router_outputs=False)
    assert legacy.state == state_contract(CONFIG)
    assert numpy_empty_past(legacy, 1)["past_key_values.2.value"].shape == (1, G, 0, HD)


def test_static_cache_shapes_come_from_the_contract():
    cache = StaticKVCache(CONFIG, batch=2, capacity=8, dtype=torch.float16, device="cpu")
    assert cache.batch == 2 and cache.capacity == 8 and len(cache.keys) == 3
    assert tuple(cache.layer(1)[0].shape) == (2, G, 8, HD) and cache.values[2].dtype == torch.float16
    past = [(torch.ones(2, G, 3, HD), torch.full((2, G, 3, HD), 2.0)) for _ in range(3)]
    cache.load(past)
    assert cache.keys[0][:, :, :3].eq(1).all() and cache.keys[0][:, :, 3:].eq(0).all()
    assert cache.values[2][:, :, :3].eq(2).all()
