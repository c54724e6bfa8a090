"""The DeepSeek line (DeepSeek-V3, GLM-4.5 / GLM-4.7-Flash, MiniMax-M2) through export and generation.

The tiny variants (tests/hf_tiny.py) turn their families' features on: multi-head latent attention
(``deepseek_v3``, ``glm4_moe_lite``: the cache is a latent and a rotary key per layer), group-limited
sigmoid routing with a selection bias (TopKRouting version 2), shared experts, dense first layers,
partial rotary (``glm4_moe``, ``minimax_m2``) and YaRN RoPE with mscale (``deepseek_v3``).
"""

from __future__ import annotations

import pytest

import moetrt
from tests.hf_tiny import hf_greedy, hf_tiny_model

pytest.importorskip("transformers")

GENERATION_VARIANTS = ["deepseek_v3", "glm4_moe", "glm4_moe_lite", "minimax_m2"]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [12, 13, 40, 41, 42], [20, 21, 22, 23, 24, 25, 26]]  # left-padded batch
STEPS = 32
PAD = 0


@pytest.fixture(scope="module")
def hf_models():
    """variant -> the seeded tiny transformers model, built once per module."""
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = hf_tiny_model(variant)
        return cache[variant]

    return get


@pytest.mark.parametrize("backend", ["torch", "ort"])
@pytest.mark.parametrize("variant", GENERATION_VARIANTS)
def test_greedy_tokens_match_transformers_generate(hf_models, tmp_path, variant, backend):
    pytest.importorskip("onnxruntime")
    from moetrt.export import onnx_from_torch
    from moetrt.runtime import Session

    hf_model = hf_models(variant)
    expected = hf_greedy(hf_model, PROMPTS, STEPS, PAD)
    model = moetrt.from_pretrained(hf_model)
    source = model if backend == "torch" else onnx_from_torch(model, tmp_path / "onnx", progress=False)
    session = Session(source, backend=backend)
    assert session.spec.state == model.state  # latent / rope_key or key / value, as the config says
    result = session.generate(PROMPTS, max_new_tokens=STEPS, stop_tokens=())
    assert result.tokens == expected
