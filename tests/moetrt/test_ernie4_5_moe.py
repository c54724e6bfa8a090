"""ERNIE-4.5-MoE through every stage: transformers parity (cache included), save, export to ONNX Runtime,
greedy tokens on torch and ort, ``optimize --target ort-cpu``, onnxruntime-genai's config, refusals.

The tiny ``ernie4_5_moe`` variant turns every feature on: ``use_bias`` (q/k/v/o, dense MLPs, shared
experts, lm_head), two shared experts, a selection bias that changes which experts win, ``moe_norm_min``
0.4 (the clamp acts on some tokens), MoE layers 1..2 of 4 (start and end index), interleaved RoPE, tied
embeddings; ``ernie4_5_moe-interval`` has MoE on every second layer. ``tests/moetrt/test_hf_parity.py`` runs
both variants through its shape tables (full forward, prefill + decode, left padding, saved folders).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import moetrt
from moetrt.errors import UnsupportedModelError
from tests.hf_tiny import (
    greedy_tokens_of, hf_forward, hf_greedy, hf_tiny_model, left_padded, reference_and_export, rel_err,
    edited_checkpoint,
)

pytest.importorskip("transformers")

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [12, 13, 40, 41, 42], [20, 21, 22, 23, 24, 25, 26]]
STEPS = 32
PAD = 0
REL_TOL = 1e-5  # fp32 against transformers, as tests/moetrt/test_hf_parity.py
ORT_ATOL = 1e-4  # exported to ONNX Runtime, absolute on logits (the bound for every family)


@pytest.fixture(scope="module")
def hf_model():
    return hf_tiny_model("ernie4_5_moe")


@pytest.fixture(scope="module")
def exported(hf_model, tmp_path_factory):
    """(reference model, its canonical export), made once for the module's ort tests."""
    pytest.importorskip("onnxruntime")
    return reference_and_export(hf_model, tmp_path_factory.mktemp("ernie") / "onnx")


def test_cache_equals_transformers_cache(hf_model):
    """Prefill + decode: logits and every layer's keys and values equal transformers' cache (moetrt's keys hold each
    head's dims de-interleaved, evens then odds: interleaved back, they are transformers' keys)."""
    from moetrt.families.deepseek_v3 import _interleave

    model = moetrt.from_pretrained(hf_model)
    ids, mask, positions = left_padded([9, 4, 7], 9, 96, seed=2)
    ref, cache = hf_forward(hf_model, ids, mask, positions)
    with torch.no_grad():
        out = model(ids, mask, positions)
    real = mask.bool()
    assert rel_err(out.logits[real], ref[real]) <= REL_TOL
    past = out.past_key_values
    for step in range(3):
        token = torch.tensor([[30 + step]] * 3)
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
        positions = positions[:, -1:] + 1
        ref, cache = hf_forward(hf_model, token, mask, positions, cache)
        with torch.no_grad():
            out = model(token, mask, positions, past)
        past = out.past_key_values
        assert rel_err(out.logits, ref) <= REL_TOL
    for i, (key, value) in enumerate(past):
        hf_key, hf_value = cache.layers[i].keys, cache.layers[i].values  # [B, G, P, Hd]
        keys = _interleave(key.movedim(-1, 0)).movedim(0, -1)
        keep = mask.bool()[:, None, :, None].expand_as(hf_key)  # padded positions hold nothing meaningful
        assert rel_err(keys[keep], hf_key[keep]) <= REL_TOL, f"layer {i} keys"
        assert rel_err(value[keep], hf_value[keep]) <= REL_TOL, f"layer {i} values"


@pytest.mark.parametrize("change", [
    dict(moe_norm_min=1e-12),  # the clamp
    dict(use_bias=False),  # every bias
    dict(moe_num_shared_experts=0),  # the shared experts
    dict(moe_layer_end_index=3),  # the end index (layer 3 becomes MoE)
    dict(moe_layer_start_index=0),  # the start index (layer 0 becomes MoE)
], ids=["norm_min", "use_bias", "shared_experts", "end_index", "start_index"])
def test_features_are_exercised(hf_model, change):
    """The tiny config only tests a feature if turning it off changes the logits (same seed)."""
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        base = moetrt.from_pretrained(hf_model)(ids).logits
        other = moetrt.from_pretrained(hf_tiny_model("ernie4_5_moe", **change))(ids).logits
    assert rel_err(other, base) > 1e-3


def test_selection_bias_and_clamp_act_on_the_tiny_model(hf_model):
    """The selection bias changes which experts win, and norm_min clamps the sum of some tokens' weights."""
    model = moetrt.from_pretrained(hf_model)
    ids = torch.tensor([PROMPTS[0] + PROMPTS[2]])
    with torch.no_grad():
        out = model(ids, output_router=True)
        for layer in model.layers:
            if layer.is_moe:
                layer.mlp.selection_bias.zero_()
        unbiased = model(ids, output_router=True)
    chose = [torch.equal(a.sort(-1).values, b.sort(-1).values) for a, b in zip(out.router_indices, unbiased.router_indices)]
    assert not all(chose), "the selection bias chose no other expert"
    sums = torch.cat([w.sum(-1) for w in out.router_weights])
    assert (sums < 1 - 1e-4).any() and (sums > 1 - 1e-6).any(), sums


def test_tiny_norm_min_equals_the_plain_renormalisation():
    """Degenerate equivalence: the released moe_norm_min 1e-12 gives the logits of norm_min 0 (TopKRouting version 2)."""
    import dataclasses

    hf = hf_tiny_model("ernie4_5_moe", moe_norm_min=1e-12)
    model = moetrt.from_pretrained(hf)
    plain = moetrt.MoETransformer(dataclasses.replace(model.config, norm_min=0.0)).eval()
    plain.load_state_dict(model.state_dict())
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)


def test_export_runs_in_onnx_runtime(exported):
    """Domain version 3 (norm_min on each TopKRouting node), logits within ORT_ATOL on prefill then decode."""
    import onnx
    import onnxruntime as ort

    model, folder = exported
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    assert {o.domain: o.version for o in proto.opset_import}["moetrt"] == 3
    routers = [n for n in proto.graph.node if n.op_type == "TopKRouting"]
    assert len(routers) == len(model.config.moe_layers) == 2
    for node in routers:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["norm_min"] == pytest.approx(0.4) and attrs["normalize"] == 1 and len(node.input) == 2
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    state = model.state
    ids, mask, positions = left_padded([9, 4, 7], 9, 96, seed=4)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
    for i in range(model.config.num_hidden_layers):
        for j, entry in enumerate(state.entries(i)):
            feeds[state.past_names(i)[j]] = np.zeros(state.shape(i, entry, 3, 0), np.float32)
    with torch.no_grad():
        ref = model(ids, mask, positions)
    outputs = session.run(None, feeds)
    real = mask.bool().numpy()
    assert np.abs(outputs[0][real] - ref.logits.numpy()[real]).max() <= ORT_ATOL
    present = outputs[1:]
    feeds = {"input_ids": np.array([[31], [32], [33]]), "position_ids": positions.numpy()[:, -1:] + 1,
             "attention_mask": np.concatenate((mask.numpy(), np.ones((3, 1), np.int64)), 1)}
    names = [n for i in range(model.config.num_hidden_layers) for n in state.past_names(i)]
    feeds.update(dict(zip(names, present)))
    with torch.no_grad():
        step = model(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"]),
                     torch.from_numpy(feeds["position_ids"]), ref.past_key_values)
    assert np.abs(session.run(None, feeds)[0] - step.logits.numpy()).max() <= ORT_ATOL


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_greedy_tokens_match_transformers_generate(hf_model, exported, backend):
    assert greedy_tokens_of(exported, backend, PROMPTS, STEPS) == hf_greedy(hf_model, PROMPTS, STEPS, PAD)


def test_save_pretrained_writes_what_transformers_reads(hf_model, tmp_path):
    """q/k rows interleaved back, the selection bias as moe_statics [1, E], biases and MoE layer range in config.json."""
    import transformers

    model = moetrt.from_pretrained(hf_model)
    moetrt.save_pretrained(model, tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert (config["moe_layer_start_index"], config["moe_layer_end_index"], config["moe_layer_interval"]) == (1, 2, 1)
    assert config["use_bias"] is True and config["moe_norm_min"] == pytest.approx(0.4)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="eager",
                                                             experts_implementation="eager").eval()
    ids = torch.tensor(PROMPTS[:1])
    ref, _ = hf_forward(hf_model, ids)
    got, _ = hf_forward(back, ids)
    assert rel_err(got, ref) <= REL_TOL
    again = moetrt.from_pretrained(tmp_path / "saved")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_optimize_ort_cpu_lowers_the_experts_and_keeps_the_router(exported, tmp_path):
    """``optimize --target ort-cpu``: com.microsoft::MoE cannot route with a selection bias or clamp the
    renormalisation, so each TopKRouting node stays (its function body routes) and the experts take the fused op
    through the log-weights path, mixed by what the clamped weights sum to; moetrt.json records it; the
    optimized folder generates the reference's tokens."""
    import onnx

    from moetrt.optimize import optimize
    from moetrt.runtime import Session

    model, folder = exported
    out = optimize(folder, tmp_path / "opt", target="ort-cpu", progress=False)
    meta = json.loads((out / "moetrt.json").read_text())
    (lowering,) = [p for p in meta["optimize"]["passes"] if p["name"] == "lower_moe"]
    assert lowering["count"] == len(model.config.moe_layers) and not lowering.get("skipped"), lowering
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    ops = [f"{n.domain}::{n.op_type}" for n in graph.node]
    assert ops.count("moetrt::TopKRouting") == len(model.config.moe_layers)
    ids = [PROMPTS[0], PROMPTS[1]]
    tokens = Session(out, backend="ort").generate(ids, max_new_tokens=12, stop_tokens=()).tokens
    assert tokens == Session(model, backend="torch").generate(ids, max_new_tokens=12, stop_tokens=()).tokens


def test_genai_config_is_written(exported):
    """A key/value cache of one shape on every layer: onnxruntime-genai's config is written."""
    _, folder = exported
    genai = json.loads((folder / "genai_config.json").read_text())
    assert genai["model"]["type"] == "qwen2" and genai["model"]["decoder"]["num_hidden_layers"] == 4


@pytest.mark.parametrize("model_type,needle", [
    ("ernie4_5_vl_moe", "ERNIE-4.5-VL is an image-text model"),
    ("ernie4_5", "is a dense model"),
])
def test_other_ernie_models_are_refused_by_name(hf_model, tmp_path, model_type, needle):
    with pytest.raises(UnsupportedModelError, match=needle):
        moetrt.from_pretrained(edited_checkpoint(hf_model, tmp_path, {"model_type": model_type}))


@pytest.mark.parametrize("edit,needle", [
    (dict(quantization_config={"quant_method": "fp8"}), "quantized with 'fp8'"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
])
def test_what_moetrt_cannot_compute_is_refused(hf_model, tmp_path, edit, needle):
    with pytest.raises(UnsupportedModelError, match=needle):
        moetrt.from_pretrained(edited_checkpoint(hf_model, tmp_path, edit))
