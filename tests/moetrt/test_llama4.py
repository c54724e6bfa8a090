"""Llama 4 through every stage: transformers parity (text and image-text checkpoints), save, greedy tokens on
torch and ort, the static cache, ``optimize --target ort-cpu`` keeping the experts' function body with the
reason, what moetrt refuses, and the degenerate equivalences of its new options.

The tiny ``llama4_text`` variant turns every feature on: chunked RoPE layers (chunk 4, shorter than every
prompt) with the L2 q/k norm; NoPE full-attention layers with attention temperature tuning (floor_scale 2, so
the queries of every position past the first are scaled); MoE layers (top-1 of 4 experts on the raw logits, the
sigmoid of the chosen one scaling the expert's input, an ungated shared expert) interleaved with dense MLPs of
another size; llama3 RoPE scaling. ``tests/moetrt/test_hf_parity.py`` (full forward, prefill + decode,
left-padded batches) and ``tests/export/test_onnx_from_torch.py`` run it through their shape tables too.
"""

from __future__ import annotations

import json

import pytest
import torch

import moetrt
from moetrt.errors import UnsupportedModelError
from tests.hf_tiny import (assert_save_round_trips, hf_forward, hf_greedy, hf_tiny_config, hf_tiny_model, left_padded,
                           randomize_, reference_and_export, rel_err)

pytest.importorskip("transformers")

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [12, 13, 40, 41, 42], [20, 21, 22, 23, 24, 25, 26]]  # > chunk 4
STEPS = 32
PAD = 0
REL_TOL = 1e-5  # fp32 against transformers, as tests/moetrt/test_hf_parity.py


@pytest.fixture(scope="module")
def hf_model():
    return hf_tiny_model("llama4_text")


@pytest.fixture(scope="module")
def exported(hf_model, tmp_path_factory):
    """(reference model, its canonical export), made once for the module's ort tests."""
    pytest.importorskip("onnxruntime")
    return reference_and_export(hf_model, tmp_path_factory.mktemp("llama4") / "onnx")


def _image_text_model():
    """A tiny Llama4ForConditionalGeneration: llama4_text's text model beside a one-layer vision tower."""
    import transformers

    vision = transformers.Llama4VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14,
        vision_output_dim=32, projector_input_dim=32, projector_output_dim=32, pixel_shuffle_ratio=0.5)
    config = transformers.Llama4Config(text_config=hf_tiny_config("llama4_text").to_dict(), vision_config=vision.to_dict(),
                                       image_token_index=95, boi_token_index=93, eoi_token_index=94)
    torch.manual_seed(0)
    model = transformers.Llama4ForConditionalGeneration._from_config(config, attn_implementation="eager",
                                                                     dtype=torch.float32)
    return randomize_(model).eval()


def test_image_text_checkpoint_imports_its_text_model(tmp_path):
    import transformers

    hf = _image_text_model()
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, 90, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    with pytest.warns(UserWarning, match="vision tower and projector"):
        model = moetrt.from_pretrained(tmp_path)
    assert model.config.model_type == "llama4" and model.config.expert_input_weighting
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref) <= REL_TOL
    # saved as the text model it is, which transformers' causal LM reads
    moetrt.save_pretrained(model, tmp_path / "text")
    assert json.loads((tmp_path / "text" / "config.json").read_text())["model_type"] == "llama4_text"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "text", attn_implementation="eager")
    with torch.no_grad():
        assert rel_err(back(input_ids=ids).logits, ref) <= REL_TOL


def test_save_pretrained_writes_what_transformers_reads(hf_model, tmp_path):
    """q/k rows go back to transformers' interleaved RoPE layout, experts to [E, D, 2F] / [E, F, D]: the same tensors."""
    assert_save_round_trips(hf_model, tmp_path / "saved")


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_greedy_tokens_match_transformers_generate(hf_model, exported, backend):
    from moetrt.runtime import Session

    expected = hf_greedy(hf_model, PROMPTS, STEPS, PAD)
    model, folder = exported
    source = model if backend == "torch" else folder
    result = Session(source, backend=backend).generate(PROMPTS, max_new_tokens=STEPS, stop_tokens=())
    assert result.tokens == expected


def test_export_writes_genai_config(exported):
    """Every layer caches keys and values of one shape: onnxruntime-genai's configuration can name them."""
    _, folder = exported
    meta = json.loads((folder / "moetrt.json").read_text())
    assert meta["genai"] == {"file": "genai_config.json"}
    genai = json.loads((folder / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["num_hidden_layers"] == 4 and genai["model"]["decoder"]["head_size"] == 16


def test_left_padded_decode_keeps_each_rows_chunks(hf_model):
    """Chunks count from each row's first real token: a left-padded batch decodes as transformers does, past a
    chunk boundary, through each side's own cache."""
    model = moetrt.from_pretrained(hf_model)
    ids, mask, positions = left_padded([3, 10], 10, 96, seed=3)
    ref, cache = hf_forward(hf_model, ids, mask, positions)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=positions)
    real = mask.bool()
    assert rel_err(out.logits[real], ref[real]) <= REL_TOL
    past = out.past_key_values
    for step in range(6):
        token = torch.tensor([[30 + step], [50 + step]])
        mask = torch.cat((mask, torch.ones(2, 1, dtype=mask.dtype)), dim=1)
        positions = positions[:, -1:] + 1
        ref, cache = hf_forward(hf_model, token, mask, positions, cache)
        with torch.no_grad():
            out = model(token, attention_mask=mask, position_ids=positions, past_key_values=past)
        past = out.past_key_values
        assert rel_err(out.logits, ref) <= REL_TOL, step


@pytest.mark.parametrize("change", [
    dict(attention_chunk_size=64),  # the chunk
    dict(attn_temperature_tuning=False),  # the NoPE layers' temperature
    dict(use_qk_norm=False),  # the L2 q/k norm
    dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),  # llama3 scaling
    dict(no_rope_layers=[1, 1, 1, 1], attn_temperature_tuning=False),  # NoPE layers
], ids=["chunk", "temperature", "qk_norm", "llama3_rope", "nope"])
def test_features_are_exercised(hf_model, change):
    """The tiny config only tests a feature if turning it off changes the logits (same seed, same weights otherwise)."""
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        base = moetrt.from_pretrained(hf_model)(ids).logits
        other_hf = hf_tiny_model("llama4_text", **change)
        other = moetrt.from_pretrained(other_hf)(ids).logits
        assert rel_err(other, hf_forward(other_hf, ids)[0]) <= REL_TOL
    assert rel_err(other, base) > 1e-3


def test_input_weighting_is_exercised(hf_model):
    """The sigmoid score scales the experts' input: weighting their output instead changes the logits (with unit
    weights the two are one op: tests/moetrt/test_sparse_moe_onnx.py)."""
    import dataclasses

    model = moetrt.from_pretrained(hf_model)
    as_output = moetrt.MoETransformer(dataclasses.replace(model.config, expert_input_weighting=False))
    as_output.load_state_dict(model.state_dict())
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        assert rel_err(as_output.eval()(ids).logits, model(ids).logits) > 1e-3


def test_long_chunk_is_full_attention_and_far_floor_scale_is_no_temperature(hf_model):
    """Degenerate equivalences: a chunk longer than the sequence is full causal attention; a floor_scale beyond
    every position leaves the NoPE layers' queries unscaled."""
    import dataclasses

    model = moetrt.from_pretrained(hf_model)
    cfg = model.config
    ids = torch.tensor([PROMPTS[0]])

    def with_config(**changes):
        other = moetrt.MoETransformer(dataclasses.replace(cfg, **changes))
        other.load_state_dict(model.state_dict())
        with torch.no_grad():
            return other.eval()(ids).logits

    full = with_config(layer_types=("full_attention",) * cfg.num_hidden_layers, attention_chunk_size=None)
    assert torch.equal(with_config(attention_chunk_size=64), full)
    assert torch.equal(with_config(attn_floor_scale=1e6), with_config(attn_temperature_tuning=False))


def test_static_cache_generates_the_dynamic_cache_tokens(hf_model):
    """The torch back end's static cache masks chunks over cache positions as the dynamic cache does."""
    from moetrt.runtime.backend_torch import TorchBackend
    from moetrt.runtime.generate import Generation, SamplingOptions

    model = moetrt.from_pretrained(hf_model)
    options = SamplingOptions(max_new_tokens=12, temperature=0.0)
    static = TorchBackend(model, static_cache=True)
    got = Generation(static, PROMPTS, options).run().tokens
    assert got == Generation(TorchBackend(model), PROMPTS, options).run().tokens


def test_optimize_ort_cpu_keeps_the_experts_body_with_the_reason(exported, tmp_path):
    """com.microsoft::MoE weights the experts' outputs: the SparseMoE function body stays, the reason recorded in
    moetrt.json; the numbers are unchanged."""
    from moetrt.optimize import optimize

    model, folder = exported
    out = optimize(folder, tmp_path / "opt", target="ort-cpu", progress=False)
    meta = json.loads((out / "moetrt.json").read_text())
    (lowering,) = [p for p in meta["optimize"]["passes"] if p["name"] == "lower_moe"]
    moe_layers = len(model.config.moe_layers)
    assert lowering["count"] == 0 and len(lowering["skipped"]) == moe_layers
    assert all(why == "weight_input 1: ONNX Runtime's MoE ops weight the experts' outputs, not their inputs"
               for why in lowering["skipped"].values()), lowering
    import onnx

    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    ops = [f"{n.domain}::{n.op_type}" for n in graph.node]
    assert ops.count("moetrt::SparseMoE") == moe_layers and "com.microsoft::MoE" not in ops
    from moetrt.runtime import Session

    ids = [PROMPTS[0]]
    tokens = Session(out, backend="ort").generate(ids, max_new_tokens=8, stop_tokens=()).tokens
    assert tokens == Session(model, backend="torch").generate(ids, max_new_tokens=8, stop_tokens=()).tokens


def test_tensorrt_plugins_refuse_input_weighting_with_the_reason(exported):
    """The SparseMoE plugins weight the outputs: a weight_input node is refused by name (the function body, which
    plugins='none' builds, computes it)."""
    import onnx_ir as ir

    from moetrt.errors import MoetrtError
    from moetrt.optimize.trt.prepare import prepare_for_tensorrt

    _, folder = exported
    for plugins in ("jit", "aot"):
        model = ir.load(str(folder / "model.onnx"))
        with pytest.raises(MoetrtError, match="does not implement weight_input=1"):
            prepare_for_tensorrt(model, plugins=plugins)


@pytest.mark.parametrize("edit,needle", [
    (dict(quantization_config={"quant_method": "fbgemm_fp8"}), "quantized with 'fbgemm_fp8'"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(layer_types=["sliding_attention", "full_attention", "chunked_attention", "full_attention"]),
     r"layer_types \['sliding_attention'\]"),
])
def test_what_moetrt_cannot_compute_is_refused(hf_model, tmp_path, edit, needle):
    hf_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(edit)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=needle):
        moetrt.from_pretrained(tmp_path)
