"""Gemma 4 MoE through every stage: transformers parity (text and image-text checkpoints), save, greedy
tokens on torch and ort, ``optimize --target ort-cpu`` keeping the GeGLU experts' function body, bad input.

The tiny ``gemma4_text`` variant turns every feature on: sliding-window layers (window 3, shorter than
every prompt) and full layers with a wider head (32 against 16), one key/value head, keys used as
values and proportional RoPE; the dense GeGLU MLP beside 6 GeGLU experts (top-2), the normed router
with its scale and per-expert scales, value norm, per-layer scalars, soft-capped logits, tied
embeddings. ``tests/moetrt/test_hf_parity.py`` and ``tests/export/test_onnx_from_torch.py`` run
both Gemma 4 variants through their shape tables too.
"""

from __future__ import annotations

import json

import pytest
import torch

import moetrt
from moetrt.errors import UnsupportedModelError
from tests.hf_tiny import (
    edited_checkpoint, greedy_tokens_of, hf_forward, hf_greedy, hf_tiny_config, hf_tiny_model, randomize_,
    reference_and_export, rel_err,
)

pytest.importorskip("transformers")

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [12, 13, 40, 41, 42], [20, 21, 22, 23, 24, 25, 26]]  # > window 3
STEPS = 32
PAD = 0
REL_TOL = 1e-5  # fp32 against transformers, as tests/moetrt/test_hf_parity.py


@pytest.fixture(scope="module")
def hf_model():
    return hf_tiny_model("gemma4_text")


@pytest.fixture(scope="module")
def exported(hf_model, tmp_path_factory):
    """(reference model, its canonical export), made once for the module's ort tests."""
    pytest.importorskip("onnxruntime")
    return reference_and_export(hf_model, tmp_path_factory.mktemp("gemma4") / "onnx")


def _image_text_model():
    """A tiny Gemma4ForConditionalGeneration: gemma4_text's text model beside a one-layer vision tower."""
    import transformers

    vision = transformers.Gemma4VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        head_dim=16, patch_size=4, position_embedding_size=64, pooling_kernel_size=1)
    config = transformers.Gemma4Config(
        text_config=hf_tiny_config("gemma4_text").to_dict(), vision_config=vision.to_dict(), audio_config=None,
        image_token_id=95, boi_token_id=93, eoi_token_id=94, video_token_id=92, boa_token_id=91, eoa_token_index=90)
    torch.manual_seed(0)
    model = transformers.Gemma4ForConditionalGeneration._from_config(
        config, attn_implementation="eager", dtype=torch.float32)
    return randomize_(model).eval()


def test_image_text_checkpoint_imports_its_text_model(tmp_path):
    hf = _image_text_model()
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, 90, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    with pytest.warns(UserWarning, match="vision and audio towers"):
        model = moetrt.from_pretrained(tmp_path)
    assert model.config.model_type == "gemma4" and model.config.layer_types[-1] == "full_attention"
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref) <= REL_TOL
    # saved as the text model it is, which transformers' causal LM reads
    import transformers

    moetrt.save_pretrained(model, tmp_path / "text")
    assert json.loads((tmp_path / "text" / "config.json").read_text())["model_type"] == "gemma4_text"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "text", attn_implementation="eager",
                                                             experts_implementation="eager")
    with torch.no_grad():
        assert rel_err(back(input_ids=ids).logits, ref) <= REL_TOL


def test_save_pretrained_writes_what_transformers_reads(hf_model, tmp_path):
    """per_expert_scale is folded into down_proj on import: saved as ones beside the scaled experts, same logits."""
    import transformers

    model = moetrt.from_pretrained(hf_model)
    moetrt.save_pretrained(model, tmp_path / "saved")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="eager",
                                                             experts_implementation="eager").eval()
    assert torch.equal(back.model.layers[0].router.per_expert_scale, torch.ones(model.config.num_experts))
    ids = torch.tensor(PROMPTS[:1])
    ref, _ = hf_forward(hf_model, ids)
    got, _ = hf_forward(back, ids)
    assert rel_err(got, ref) <= REL_TOL
    again = moetrt.from_pretrained(tmp_path / "saved")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_greedy_tokens_match_transformers_generate(hf_model, exported, backend):
    assert greedy_tokens_of(exported, backend, PROMPTS, STEPS) == hf_greedy(hf_model, PROMPTS, STEPS, PAD)


@pytest.mark.parametrize("change", [
    dict(sliding_window=64),  # the window
    dict(final_logit_softcapping=None),  # the soft cap
    dict(attention_k_eq_v=False),  # keys as values on full layers (a v_proj instead)
    dict(rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                          "full_attention": {"rope_type": "default", "rope_theta": 1e6}}),  # proportional RoPE
], ids=["window", "softcap", "k_eq_v", "proportional_rope"])
def test_features_are_exercised(hf_model, change):
    """The tiny config only tests a feature if turning it off changes the logits (same seed, same weights otherwise)."""
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        base = moetrt.from_pretrained(hf_model)(ids).logits
        other = moetrt.from_pretrained(hf_tiny_model("gemma4_text", **change))(ids).logits
    assert rel_err(other, base) > 1e-3


def test_proportional_rope_with_factor_one_is_plain_rope():
    """Degenerate equivalence: proportional RoPE over the whole head (partial_rotary_factor 1) is default RoPE."""
    from moetrt.rope import RotaryEmbedding

    positions = torch.arange(40)[None]
    plain = RotaryEmbedding(32, 1e6)(positions, torch.float32)
    whole = RotaryEmbedding(32, 1e6, {"rope_type": "proportional", "partial_rotary_factor": 1.0})(positions, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(plain, whole))
    quarter = RotaryEmbedding(32, 1e6, {"rope_type": "proportional", "partial_rotary_factor": 0.25})
    assert int((quarter.inv_freq != 0).sum()) == 4  # int(0.25 * 32 // 2) rotated pairs, the others pass


def test_unit_per_expert_scale_is_the_plain_router(hf_model):
    """Degenerate equivalence: per_expert_scale of ones leaves the experts' down projections as stored."""
    hf = hf_tiny_model("gemma4_text")
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.router.per_expert_scale.fill_(1.0)
    model = moetrt.from_pretrained(hf)
    for i, layer in enumerate(hf.model.layers):
        assert torch.equal(model.layers[i].mlp.experts.down_proj, layer.experts.down_proj)


def test_optimize_ort_cpu_keeps_the_geglu_experts_body_with_the_reason(exported, tmp_path):
    """com.microsoft::MoE has no GeGLU: the SparseMoE function body stays, the reason in moetrt.json; numbers unchanged."""
    from moetrt.optimize import optimize

    model, folder = exported
    out = optimize(folder, tmp_path / "opt", target="ort-cpu", progress=False)
    meta = json.loads((out / "moetrt.json").read_text())
    (lowering,) = [p for p in meta["optimize"]["passes"] if p["name"] == "lower_moe"]
    assert lowering["count"] == 0 and len(lowering["skipped"]) == model.config.num_hidden_layers
    assert all("the node has activation='gelu_tanh'" in why for why in lowering["skipped"].values()), lowering
    import onnx

    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    ops = [f"{n.domain}::{n.op_type}" for n in graph.node]
    assert ops.count("moetrt::SparseMoE") == model.config.num_hidden_layers and "com.microsoft::MoE" not in ops
    from moetrt.runtime import Session

    ids = [PROMPTS[0]]
    tokens = Session(out, backend="ort").generate(ids, max_new_tokens=8, stop_tokens=()).tokens
    assert tokens == Session(model, backend="torch").generate(ids, max_new_tokens=8, stop_tokens=()).tokens


@pytest.mark.parametrize("edit,needle", [
    (dict(hidden_size_per_layer_input=16), "per-layer input embeddings"),
    (dict(num_kv_shared_layers=2), "num_kv_shared_layers"),
    (dict(enable_moe_block=False), "no MoE block"),
    (dict(hidden_activation="gelu"), "hidden_activation 'gelu'"),
])
def test_what_moetrt_cannot_compute_is_refused(hf_model, tmp_path, edit, needle):
    with pytest.raises(UnsupportedModelError, match=needle):
        moetrt.from_pretrained(edited_checkpoint(hf_model, tmp_path, edit))


def test_checkpoint_folder_streams_into_the_same_export(hf_model, exported, tmp_path):
    """Streaming from the folder (per_expert_scale folded by its companion placement, the full layers' own RoPE
    rebuilt) writes the same initializers as the in-memory export."""
    from tests.moetrt.family_checks import assert_streamed_export_equal

    assert_streamed_export_equal(hf_model, exported[1], tmp_path)


def test_static_cache_generates_the_dynamic_cache_tokens(hf_model):
    """The torch back end's static cache (what CUDA graphs replay) holds each layer's own key/value shape."""
    from moetrt.runtime.backend_torch import TorchBackend
    from moetrt.runtime.generate import Generation, SamplingOptions

    model = moetrt.from_pretrained(hf_model)
    options = SamplingOptions(max_new_tokens=12, temperature=0.0)
    static = TorchBackend(model, static_cache=True)
    got = Generation(static, PROMPTS, options).run().tokens
    assert got == Generation(TorchBackend(model), PROMPTS, options).run().tokens
    shapes = {tuple(t.shape[1::2]) for layer in static._cache.buffers for t in layer}  # (kv heads, head dim)
    assert shapes == {(2, 16), (1, 32)}  # sliding layers, full layers
