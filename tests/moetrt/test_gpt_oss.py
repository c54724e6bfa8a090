"""gpt-oss through every stage: MXFP4 checkpoints, transformers parity, export, greedy tokens, bad input.

The tiny ``gpt_oss`` variant turns every feature on: sliding-window layers (window 3) alternating
with full attention, attention sinks, q/k/v/o biases, router and expert biases, YaRN RoPE and a
clamp limit (0.3) small enough that the clamped SwiGLU clips gate and up of random weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import moetrt
from moetrt.errors import CheckpointError, UnsupportedModelError
from tests.hf_tiny import assert_save_round_trips, hf_forward, hf_greedy, hf_tiny_model, rel_err, save_mxfp4_checkpoint

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [12, 13, 40, 41, 42], [20, 21, 22, 23, 24, 25, 26]]  # > window 3
STEPS = 32
PAD = 0


@pytest.fixture(scope="module")
def hf_model():
    return hf_tiny_model("gpt_oss")


def test_mxfp4_checkpoint_matches_transformers_dequantization(hf_model, tmp_path):
    folder = tmp_path / "mxfp4"
    reference = save_mxfp4_checkpoint(hf_model, folder)
    model = moetrt.from_pretrained(folder)
    # the dequantized experts bit for bit (ours are de-interleaved: gate rows, then up rows)
    for i in range(model.config.num_hidden_layers):
        ref = reference.model.layers[i].mlp.experts
        ours = model.layers[i].mlp.experts
        ffn = model.config.intermediate_size
        gate_up = ref.gate_up_proj.transpose(1, 2)  # [E, 2F, D] interleaved
        assert torch.equal(ours.gate_up_proj[:, :ffn], gate_up[:, 0::2])
        assert torch.equal(ours.gate_up_proj[:, ffn:], gate_up[:, 1::2])
        assert torch.equal(ours.down_proj, ref.down_proj.transpose(1, 2))
    ids = torch.tensor([PROMPTS[0]])
    ref_logits, _ = hf_forward(reference, ids)
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref_logits) <= 1e-5


def test_mxfp4_checkpoint_streams_into_the_same_export(hf_model, tmp_path):
    from moetrt.export import onnx_from_torch

    folder = tmp_path / "mxfp4"
    save_mxfp4_checkpoint(hf_model, folder)
    streamed = onnx_from_torch(folder, tmp_path / "streamed", progress=False, external_data=True)
    in_memory = onnx_from_torch(moetrt.from_pretrained(folder), tmp_path / "memory", progress=False,
                                external_data=True, streaming=False)
    assert (streamed / "model.onnx.data").read_bytes() == (in_memory / "model.onnx.data").read_bytes()


def test_mxfp4_checkpoint_without_a_scale_tensor_is_refused(hf_model, tmp_path):
    folder = tmp_path / "mxfp4"
    save_mxfp4_checkpoint(hf_model, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.down_proj_scales"]
    save_file(tensors, str(folder / "model.safetensors"))
    for call in (moetrt.from_pretrained, moetrt.checkpoint.checkpoint_sources):
        with pytest.raises(CheckpointError, match=r"missing.*layers\.1\.mlp\.experts\.down_proj_scales"):
            call(folder)


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_layer_types_that_disagree_with_the_layer_count_are_refused(hf_model, tmp_path):
    folder = tmp_path / "ckpt"
    hf_model.save_pretrained(folder)
    _edit_config(folder, layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(CheckpointError, match="2 layer_types for 3 layers"):
        moetrt.from_pretrained(folder)


@pytest.mark.parametrize("rope_parameters,needle", [
    ({"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0], "long_factor": [1.0]}, "'longrope'"),
    ({"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "beta_turbo": 2.0}, "beta_turbo"),
])
def test_unsupported_rope_is_refused_by_name(hf_model, tmp_path, rope_parameters, needle):
    folder = tmp_path / "ckpt"
    hf_model.save_pretrained(folder)
    _edit_config(folder, rope_parameters=rope_parameters)
    with pytest.raises(UnsupportedModelError, match=needle):
        moetrt.from_pretrained(folder)


def test_other_quantizations_are_refused(hf_model, tmp_path):
    folder = tmp_path / "ckpt"
    hf_model.save_pretrained(folder)
    _edit_config(folder, quantization_config={"quant_method": "fp8"})
    with pytest.raises(UnsupportedModelError, match="'fp8'"):
        moetrt.from_pretrained(folder)


def test_save_pretrained_writes_what_transformers_reads(hf_model, tmp_path):
    assert_save_round_trips(hf_model, tmp_path / "saved")


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_greedy_tokens_match_transformers_generate(hf_model, tmp_path, backend):
    pytest.importorskip("onnxruntime")
    from moetrt.export import onnx_from_torch
    from moetrt.runtime import Session

    expected = hf_greedy(hf_model, PROMPTS, STEPS, PAD)
    model = moetrt.from_pretrained(hf_model)
    source = model if backend == "torch" else onnx_from_torch(model, tmp_path / "onnx", progress=False)
    result = Session(source, backend=backend).generate(PROMPTS, max_new_tokens=STEPS, stop_tokens=())
    assert result.tokens == expected


def test_clamp_and_window_are_exercised(hf_model):
    """The tiny config is only a test of the clamp and the window if both change the output."""
    ids = torch.tensor([PROMPTS[0]])
    model = moetrt.from_pretrained(hf_model)
    with torch.no_grad():
        base = model(ids).logits
        unclamped = moetrt.from_pretrained(hf_tiny_model("gpt_oss", swiglu_limit=100.0))(ids).logits
        unwindowed = moetrt.from_pretrained(hf_tiny_model("gpt_oss", sliding_window=64))(ids).logits
    assert rel_err(unclamped, base) > 1e-3
    assert rel_err(unwindowed, base) > 1e-3
