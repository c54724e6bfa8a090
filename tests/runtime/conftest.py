"""Fixtures of the runtime tests: a random transformers Mixtral, a checkpoint folder with a word-level
tokenizer, and their exports (built once per test session)."""

from __future__ import annotations

import json
import warnings

import pytest

import moetrt
from tests.hf_tiny import hf_tiny_model
from tests.runtime.tiny_models import BOS, EOS, PAD, WORDS, word_tokenizer_json


@pytest.fixture(scope="session")
def hf_mixtral():
    """The project's tiny random transformers Mixtral (tests/hf_tiny.py)."""
    pytest.importorskip("transformers")
    return hf_tiny_model("mixtral")


@pytest.fixture(scope="session")
def hf_model_export(hf_mixtral, tmp_path_factory):
    """The transformers model, loaded into moetrt and exported (without router outputs)."""
    from moetrt.export import onnx_from_torch

    out = tmp_path_factory.mktemp("hf") / "exported"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_from_torch(moetrt.from_pretrained(hf_mixtral), out, router_outputs=False, progress=False)
    return out


@pytest.fixture(scope="session")
def text_checkpoint(tmp_path_factory):
    """A random 3-layer checkpoint folder with a tokenizer and generation_config.json (eos = 2)."""
    pytest.importorskip("tokenizers")
    config = moetrt.MoEConfig(
        vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, intermediate_size=48, max_position_embeddings=64,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    model = moetrt.MoETransformer.from_config(config, std=0.3)
    folder = tmp_path_factory.mktemp("ckpt") / "checkpoint"
    moetrt.save_pretrained(model, folder, extra_files={
        "tokenizer.json": word_tokenizer_json(),
        "generation_config.json": json.dumps({"eos_token_id": EOS, "pad_token_id": PAD}),
    })
    return folder


@pytest.fixture(scope="session")
def text_export(text_checkpoint, tmp_path_factory):
    """``text_checkpoint`` exported with router outputs (tokenizer files copied along)."""
    from moetrt.export import onnx_from_torch

    out = tmp_path_factory.mktemp("exp") / "exported"
    onnx_from_torch(text_checkpoint, out, router_outputs=True, progress=False)
    return out
