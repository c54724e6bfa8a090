"""Hybrid linear-attention MoE (Qwen3-Next, Qwen3.5-MoE) against transformers, through every stage.

The tiny variants (tests/hf_tiny.py) mix Gated DeltaNet and full-attention layers, 10 experts top-3,
a sigmoid-gated shared expert, partial rotary and the attention output gate. The DeltaNet's conv and
recurrent states are state-contract entries: they travel as graph I/O, through the Sessions and
through ``generate`` on left-padded batches.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import moetrt
from moetrt.gated_deltanet import chunk_gated_delta_rule, recurrent_gated_delta_rule, scan_gated_delta_rule
from moetrt.parity.tolerances import TOLERANCES, check_close
from moetrt.state import CONV_STATE, KEY, RECURRENT_STATE, VALUE
from tests.hf_tiny import hf_forward, hf_greedy, hf_tiny_model, left_padded, randomize_, rel_err

pytest.importorskip("transformers")

VARIANTS = ["qwen3_next", "qwen3_5_moe"]
REL_TOL = 1e-5  # max|ours - hf| / max|hf|, as tests/moetrt/test_hf_parity.py
PROMPT_LENGTHS = [1, 13, 70]  # 70 crosses the DeltaNet's 64-token chunk
DECODE_STEPS = 3
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [12, 13, 40, 41, 42], [20, 21, 22, 23, 24, 25, 26]]  # left-padded batch
STEPS = 32
# (batch, seq, Hk, Hv, Dk, Dv) of the delta-rule forms' agreement
RULE_SHAPES = [(1, 1, 2, 2, 8, 8), (2, 13, 2, 4, 8, 12), (3, 70, 1, 3, 16, 4), (1, 128, 2, 2, 4, 4)]


@pytest.fixture(scope="module")
def pair():
    """variant -> (transformers model, moetrt model), built once per module."""
    cache = {}

    def get(variant):
        if variant not in cache:
            hf = hf_tiny_model(variant)
            cache[variant] = hf, moetrt.from_pretrained(hf)
        return cache[variant]

    return get


@pytest.fixture(scope="module")
def exported(pair, tmp_path_factory):
    """variant -> its fp32 export folder, written once per module."""
    from moetrt.export import onnx_from_torch

    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = onnx_from_torch(pair(variant)[1], tmp_path_factory.mktemp(variant) / "onnx", progress=False)
        return cache[variant]

    return get


def _ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 96, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", RULE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_delta_rule_forms_agree(shape):
    """The chunked form (prefill), the token steps (decode) and the Scan (export) compute one recurrence."""
    batch, seq, hk, hv, dk, dv = shape
    g = torch.Generator().manual_seed(seq)
    q, k = torch.randn(batch, seq, hk, dk, generator=g), torch.randn(batch, seq, hk, dk, generator=g)
    v = torch.randn(batch, seq, hv, dv, generator=g)
    decay, beta = -torch.rand(batch, seq, hv, generator=g) * 2, torch.rand(batch, seq, hv, generator=g)
    state = torch.randn(batch, hv, dk, dv, generator=g)
    ref_out, ref_state = recurrent_gated_delta_rule(q, k, v, decay, beta, state)
    tol = TOLERANCES[("fp32", "state")]
    for form in (chunk_gated_delta_rule, scan_gated_delta_rule):
        out, new_state = form(q, k, v, decay, beta, state)
        assert out.shape == (batch, seq, hv, dv) and new_state.shape == (batch, hv, dk, dv)
        assert check_close(out.numpy(), ref_out.numpy(), tol).ok, form.__name__
        assert check_close(new_state.numpy(), ref_state.numpy(), tol).ok, form.__name__
    assert float((ref_state - state).abs().max()) > 1e-2  # the state really moved


@pytest.mark.parametrize("prompt", PROMPT_LENGTHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_prompt_then_decode_matches_transformers(pair, variant, prompt, record_max):
    hf, ours = pair(variant)
    ids = _ids(2, prompt + DECODE_STEPS, seed=prompt)
    ref, hf_cache = hf_forward(hf, ids[:, :prompt])
    with torch.no_grad():
        out = ours(ids[:, :prompt])
    errors = [rel_err(out.logits, ref)]
    cache = out.past_key_values
    for step in range(prompt, prompt + DECODE_STEPS):
        ref, hf_cache = hf_forward(hf, ids[:, step:step + 1], cache=hf_cache)
        with torch.no_grad():
            out = ours(ids[:, step:step + 1], past_key_values=cache)
        cache = out.past_key_values
        errors.append(rel_err(out.logits, ref))
    record_max("hybrid: max |ours - hf| / max |hf| (fp32)", f"{variant:<12} prompt {prompt:>2} + decode", max(errors))
    assert max(errors) <= REL_TOL, errors


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_contract_follows_layer_types(pair, variant):
    _, ours = pair(variant)
    cfg = ours.config
    with torch.no_grad():
        out = ours(_ids(2, 5, seed=1))
    for i, (entries, tensors) in enumerate(zip(ours.state.layers, out.past_key_values, strict=True)):
        linear = cfg.layer_types[i] == "linear_attention"
        assert entries == ((CONV_STATE, RECURRENT_STATE) if linear else (KEY, VALUE))
        for entry, tensor in zip(entries, tensors, strict=True):
            assert tuple(tensor.shape) == ours.state.shape(i, entry, 2, 5)
        if linear:
            assert tensors[0].shape == (2, cfg.linear_conv_dim, cfg.linear_conv_kernel_dim - 1)
            assert tensors[1].dtype == torch.float32
    assert "linear_attention" in cfg.layer_types and "full_attention" in cfg.layer_types


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_equals_single_steps(pair, variant):
    """A prefill of N tokens leaves the state (and last logits) that N one-token steps leave."""
    _, ours = pair(variant)
    ids = _ids(2, 13, seed=4)
    with torch.no_grad():
        full = ours(ids)
        cache = None
        for t in range(ids.shape[1]):
            step = ours(ids[:, t:t + 1], past_key_values=cache)
            cache = step.past_key_values
    assert check_close(step.logits[:, -1].numpy(), full.logits[:, -1].numpy(), TOLERANCES[("fp32", "logits")]).ok
    for i, (a, b) in enumerate(zip(full.past_key_values, cache, strict=True)):
        for entry, x, y in zip(ours.state.entries(i), a, b, strict=True):
            kind = "kv" if entry.grows else "state"
            assert check_close(y.numpy(), x.numpy(), TOLERANCES[("fp32", kind)]).ok, (i, entry.name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padding_leaves_states_as_unpadded(pair, variant):
    """Padded positions never reach a linear-attention state: a padded row equals the row run alone."""
    _, ours = pair(variant)
    ids, mask, positions = left_padded([4, 11], 11, 96, seed=3)
    with torch.no_grad():
        padded = ours(ids, attention_mask=mask, position_ids=positions)
        alone = ours(ids[:1, -4:])
    for i, (a, b) in enumerate(zip(padded.past_key_values, alone.past_key_values, strict=True)):
        for entry, x, y in zip(ours.state.entries(i), a, b, strict=True):
            if not entry.grows:
                assert check_close(x[:1].numpy(), y.numpy(), TOLERANCES[("fp32", "state")]).ok, (i, entry.name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_pretrained_loads_in_transformers(pair, variant, tmp_path):
    """moetrt's save_pretrained writes the family's own layout (Qwen3-Next's fused in_proj_qkvz / in_proj_ba)."""
    import transformers

    hf, ours = pair(variant)
    moetrt.save_pretrained(ours, tmp_path / "saved")
    back = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "saved", attn_implementation="eager", experts_implementation="eager", dtype=torch.float32).eval()
    ids = _ids(2, 9, seed=5)
    ref, _ = hf_forward(hf, ids)
    got, _ = hf_forward(back, ids)
    assert torch.equal(got, ref)
    assert moetrt.from_pretrained(tmp_path / "saved").config == ours.config


def test_image_text_checkpoint_imports_its_text_model(tmp_path, record_max):
    """A Qwen3.5-MoE image-text release: the text model loads, the vision tower is skipped with a warning."""
    import transformers

    text = hf_tiny_model("qwen3_5_moe").config.to_dict()
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=text["hidden_size"],
                  patch_size=4, num_position_embeddings=16)
    config = transformers.Qwen3_5MoeConfig(text_config=text, vision_config=vision)
    torch.manual_seed(0)
    hf = transformers.Qwen3_5MoeForConditionalGeneration(config).eval()
    randomize_(hf)
    hf.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = moetrt.from_pretrained(tmp_path)
    assert any("vision tower" in str(w.message) for w in caught)
    ids = _ids(2, 12, seed=6)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        err = rel_err(ours(ids).logits, ref)
    record_max("hybrid: max |ours - hf| / max |hf| (fp32)", "qwen3_5_moe image-text checkpoint", err)
    assert err <= REL_TOL


# each export costs ~1 minute on 2 cores: Qwen3-Next's goes through ORT with -m slow, Qwen3.5-MoE's always
ORT_VARIANTS = [pytest.param("qwen3_next", marks=pytest.mark.slow), "qwen3_5_moe"]


def test_wrong_state_shape_is_refused(pair):
    _, ours = pair("qwen3_5_moe")
    with torch.no_grad():
        past = list(ours(_ids(1, 3, seed=2)).past_key_values)
    past[0] = (past[0][0], past[0][1][:, :1])
    with pytest.raises(moetrt.MoetrtError, match=r"past_key_values\[0\] recurrent_state must be \[1, 4, 8, 12\]"):
        ours(_ids(1, 1, seed=2), past_key_values=past)


def test_bf16_export_is_refused_and_leaves_nothing(pair, tmp_path):
    """The DeltaNet's causal conv has no bfloat16 ONNX Conv: refused up front, in the API's words, no folder left."""
    from moetrt.export import onnx_from_torch

    _, ours = pair("qwen3_5_moe")
    with pytest.raises(moetrt.UnsupportedModelError, match=r"bf16 export .* linear-attention layers.*dtype='fp16'") as err:
        onnx_from_torch(ours, tmp_path / "out", dtype="bf16", progress=False)
    assert err.value.for_cli().startswith("--dtype bf16") and not (tmp_path / "out").exists()


def test_incomplete_configs_are_refused(pair):
    from moetrt.checkpoint import config_from_hf

    hf, _ = pair("qwen3_next")
    config = hf.config.to_dict()
    del config["linear_num_value_heads"]
    with pytest.raises(moetrt.CheckpointError, match="lacks the field linear_num_value_heads"):
        config_from_hf(config)
    with pytest.raises(moetrt.CheckpointError, match="lacks the text_config object"):
        config_from_hf({"model_type": "qwen3_5_moe"})


@pytest.mark.parametrize("variant", ORT_VARIANTS)
def test_export_matches_on_ort(pair, exported, variant, record_max):
    """The Scan-based DeltaNet runs on plain ONNX Runtime: prefill, then decode through the graph's own state."""
    ort = pytest.importorskip("onnxruntime")
    _, ours = pair(variant)
    session = ort.InferenceSession(str(exported(variant) / "model.onnx"), providers=["CPUExecutionProvider"])
    ids, mask, positions = left_padded([7, 13], 13, 96, seed=8)
    state = {n: np.zeros(s, np.float32) for n, s in ours.state.empty_past(2).items()}
    with torch.no_grad():
        out = ours(ids, attention_mask=mask, position_ids=positions)
    names = [o.name for o in session.get_outputs()]
    for step in range(3):
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy(), **state}
        got = dict(zip(names, session.run(None, feeds)))
        real = mask[:, -ids.shape[1]:].bool().numpy()
        assert check_close(got["logits"][real], out.logits.numpy()[real], TOLERANCES[("fp32", "logits")]).ok
        record_max("hybrid: max |ort - torch| / max |torch| (fp32)", variant,
                   rel_err(torch.from_numpy(got["logits"][real]), out.logits[torch.from_numpy(real)]))
        for i, tensors in enumerate(out.past_key_values):
            for entry, tensor in zip(ours.state.entries(i), tensors, strict=True):
                name = f"present.{i}.{entry.name}"
                if not entry.grows:  # key/value at padded positions are arbitrary; the states are not
                    assert check_close(got[name], tensor.numpy(), TOLERANCES[("fp32", "state")]).ok, name
        state = {p: got[c] for c, p in ours.state.pairs()}
        ids = _ids(2, 1, seed=20 + step)
        mask = torch.cat((mask, torch.ones(2, 1, dtype=mask.dtype)), dim=1)
        positions = positions[:, -1:] + 1
        with torch.no_grad():
            out = ours(ids, attention_mask=mask, position_ids=positions, past_key_values=out.past_key_values)


@pytest.mark.parametrize("variant,backend", [
    *((v, b) for v in VARIANTS for b in ("torch", "torch-static")),
    *(pytest.param(p.values[0], "ort", marks=p.marks) if hasattr(p, "values") else (p, "ort") for p in ORT_VARIANTS),
])
def test_greedy_tokens_match_transformers_generate(pair, exported, variant, backend):
    """32 greedy tokens for a left-padded batch of three prompts equal transformers' generate."""
    from moetrt.runtime import Session

    if backend == "ort":
        pytest.importorskip("onnxruntime")
    hf, ours = pair(variant)
    expected = hf_greedy(hf, PROMPTS, STEPS, 0)
    if backend == "ort":
        session = Session(exported(variant), backend="ort")
    else:
        session = Session(ours, backend="torch", static_cache=backend == "torch-static")
    assert session.spec.state == ours.state
    assert session.generate(PROMPTS, max_new_tokens=STEPS, stop_tokens=()).tokens == expected
