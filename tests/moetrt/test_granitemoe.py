"""Granite-MoE (``granitemoe``, ``granitemoeshared``) through every stage: greedy tokens on torch and ort equal
transformers' ``generate``, each multiplier exercised, the degenerate equivalence with Mixtral (multipliers of 1
and Granite's softmax over the top-k logits are Mixtral's model), ``optimize --target ort-cpu`` lowering the
experts to ``com.microsoft::MoE``, ``genai_config.json``, save, refusals.

The tiny variants turn every feature on: embedding 2.5, residual 0.6, attention scale 0.2 (not head_dim^-0.5 =
0.25), logits divided by 1.7, q/k/v/o biases; ``granitemoeshared`` adds the ungated shared expert.
``tests/moetrt/test_hf_parity.py`` (logits: full forward, prefill + decode, left-padded; saved and sharded
folders), ``tests/export/test_onnx_from_torch.py`` (export -> ORT) and ``tests/optimize/test_trt_rtx.py``
(TensorRT-RTX build) run both variants through their shape tables too.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import moetrt
from moetrt.errors import UnsupportedModelError
from tests.hf_tiny import hf_forward, hf_tiny_model, rel_err
from tests.moetrt.family_checks import (
    PROMPTS, assert_greedy_matches_generate, assert_saved_round_trips, edited_checkpoint, export, optimize_ort_cpu,
)

pytest.importorskip("transformers")

REL_TOL = 1e-5  # fp32 against transformers, as tests/moetrt/test_hf_parity.py
VARIANT = "granitemoeshared"  # granitemoe plus the shared expert: every feature of both


@pytest.fixture(scope="module")
def hf_model():
    return hf_tiny_model(VARIANT)


@pytest.fixture(scope="module")
def exported(hf_model, tmp_path_factory):
    """(reference model, its canonical export), made once for the module's ort tests."""
    pytest.importorskip("onnxruntime")
    return export(hf_model, tmp_path_factory.mktemp("granite") / "onnx")


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_greedy_tokens_match_transformers_generate(hf_model, exported, backend):
    assert_greedy_matches_generate(hf_model, *exported, backend)


@pytest.mark.parametrize("change", [
    dict(embedding_multiplier=1.0), dict(residual_multiplier=1.0), dict(attention_multiplier=0.25),
    dict(logits_scaling=1.0), dict(shared_intermediate_size=0),
], ids=["embedding", "residual", "attention", "logits", "shared_expert"])
def test_features_are_exercised(hf_model, change):
    """The tiny config only tests a feature if turning it off changes the logits (same seed, same weights otherwise)."""
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        base = moetrt.from_pretrained(hf_model)(ids).logits
        other = moetrt.from_pretrained(hf_tiny_model(VARIANT, **change))(ids).logits
    assert rel_err(other, base) > 1e-3


def test_unit_multipliers_are_mixtral(tmp_path):
    """Degenerate equivalence: Granite-MoE with multipliers of 1 and the attention scale head_dim^-0.5 is a Mixtral.

    transformers' own two implementations agree: the Granite model's weights saved as a Mixtral checkpoint give
    transformers' MixtralForCausalLM the Granite logits (Granite's softmax over the top-k logits is Mixtral's
    softmax, top-k, renormalised). moetrt exports that Granite model as the Mixtral routing node.
    """
    import transformers

    hf = hf_tiny_model("granitemoe", embedding_multiplier=1.0, residual_multiplier=1.0, attention_multiplier=0.25,
                       logits_scaling=1.0, attention_bias=False)
    model = moetrt.from_pretrained(hf)
    as_mixtral = moetrt.MoETransformer(dataclasses.replace(model.config, model_type="mixtral", attention_scale=None))
    as_mixtral.load_state_dict(model.state_dict())
    moetrt.save_pretrained(as_mixtral.eval(), tmp_path / "mixtral")
    mixtral = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "mixtral", attn_implementation="eager", experts_implementation="eager").eval()
    assert type(mixtral).__name__ == "MixtralForCausalLM"
    ids = torch.tensor(PROMPTS[:1])
    granite_logits, _ = hf_forward(hf, ids)
    mixtral_logits, _ = hf_forward(mixtral, ids)
    assert rel_err(mixtral_logits, granite_logits) <= REL_TOL
    with torch.no_grad():
        assert torch.equal(model(ids).logits, as_mixtral(ids).logits)


def test_save_pretrained_writes_the_on_disk_layout_transformers_reads(hf_model, tmp_path):
    from safetensors import safe_open

    model = moetrt.from_pretrained(hf_model)
    moetrt.save_pretrained(model, tmp_path / "saved")
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert {"model.layers.0.block_sparse_moe.input_linear.weight", "model.layers.0.block_sparse_moe.output_linear.weight",
            "model.layers.0.block_sparse_moe.router.layer.weight", "model.layers.0.shared_mlp.input_linear.weight",
            "model.layers.0.shared_mlp.output_linear.weight"} <= names
    assert assert_saved_round_trips(hf_model, model, tmp_path / "saved", REL_TOL) == "GraniteMoeSharedForCausalLM"


def test_optimize_ort_cpu_lowers_the_experts(exported, tmp_path):
    """Granite's routing is Mixtral's (softmax, top-k renormalised) and its experts SwiGLU: com.microsoft::MoE
    computes both, so every layer lowers; tokens stay those of the reference."""
    model, folder = exported
    lowering, ops = optimize_ort_cpu(model, folder, tmp_path / "opt")
    assert lowering["count"] == model.config.num_hidden_layers and not lowering.get("skipped"), lowering
    assert ops.count("com.microsoft::MoE") == model.config.num_hidden_layers and "moetrt::SparseMoE" not in ops


def test_export_writes_a_genai_config(exported):
    _, folder = exported
    meta = json.loads((folder / "moetrt.json").read_text())
    assert meta["genai"] == {"file": "genai_config.json"} and (folder / "genai_config.json").exists()


@pytest.mark.parametrize("edit,needle", [
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(model_type="granitemoehybrid"), "'granitemoehybrid' is not supported"),
])
def test_what_moetrt_cannot_compute_is_refused(hf_model, tmp_path, edit, needle):
    with pytest.raises(UnsupportedModelError, match=needle):
        moetrt.from_pretrained(edited_checkpoint(hf_model, tmp_path, edit))
