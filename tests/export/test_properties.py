"""Property: for any small MoE config, the canonical ONNX run in ONNX Runtime matches the PyTorch model.

Hypothesis draws the config (experts 1-16, k 1-4, grouped-query heads, hidden sizes that are not
powers of two, explicit or derived head_dim, shared experts with and without gate, dense layers
among MoE layers, softmax/sigmoid scoring, normalize, routed scale, q/k norms, tied embeddings,
attention bias, sliding window, fp32) and the inputs (batch, new tokens and cache length never
the traced (2, 5, 3), left padding), exports once per config and checks every input case:

- a prefill alone, or a prefill of the cache followed by a step fed ONNX Runtime's own ``present``
  tensors (the way a decode loop runs the model);
- router choices per token as sets, tie-aware: a flip counts as a near-tie only when the
  reference's k-th/(k+1)-th score gap is below the table's ``router_gap``; the row of a near-tie
  token is then left out of the numeric checks (its later activations may legitimately differ);
- ``logits``, ``present`` key/value and router weights on the real (unpadded) tokens, within
  the fp32 entries of the tolerance table.

A second strategy draws gpt-oss-style configs: a config as above with gpt-oss's clamped SwiGLU
experts, expert and router biases, attention sinks, ``layer_types`` mixing full attention with a
sliding window shorter than the drawn sequences, and sometimes YaRN RoPE.

``pytest`` runs a few dozen derandomized examples; ``pytest -m slow`` runs many more.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import moetrt
from moetrt.export import onnx_from_torch
from moetrt.parity import check_close, tolerance
from moetrt.parity.router import FAILURE, MATCH, NEAR_TIE, classify

ort = pytest.importorskip("onnxruntime")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import event, example, given, note
from hypothesis import strategies as st

TRACED = (2, 5, 3)  # (batch, new tokens, past) of the export's example inputs
MAX_POSITIONS = 64
# generated model examples (3 explicit corner examples run besides): each is one export, ~3-4 s of
# CPU that dwarfs the checks, so an example checks up to 3 input cases against its one export
EXAMPLES = {"ci": 17, "slow": 300}
# gpt-oss-style models: a few more examples on top of the ones above
GPT_OSS_EXAMPLES = {"ci": 4, "slow": 150}
# windows of 1-4 positions: shorter than most drawn sequences (past + new tokens up to 16)
WINDOWS = (1, 2, 3, 4)
# gpt-oss's YaRN (factor 32 over 4096 positions), scaled to MAX_POSITIONS; with and without truncation
YARN = [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8, "beta_fast": 32.0, "beta_slow": 1.0,
     "truncate": False},
]
# tracing time grows with the layers: CI draws 1-2 (a 3-layer corner example keeps MoE, dense, MoE)
MAX_LAYERS = {"ci": 2, "slow": 3}
# derived head_dim values with an odd factor, so hidden = heads * head_dim is never a power of two
DERIVED_HEAD_DIMS = [6, 10, 12, 14]
EXPLICIT_HEAD_DIMS = [2, 4, 6, 8]


def _power_of_two(n: int) -> bool:
    return n & (n - 1) == 0


@st.composite
def configs(draw, max_layers: int = 3) -> moetrt.MoEConfig:
    kv_heads = draw(st.integers(1, 3), label="kv_heads")
    heads = kv_heads * draw(st.integers(1, 3), label="group")
    if draw(st.booleans(), label="explicit_head_dim"):
        # hidden_size need not divide by the heads when head_dim is given
        head_dim = draw(st.sampled_from(EXPLICIT_HEAD_DIMS), label="head_dim")
        hidden = draw(st.integers(8, 48).filter(lambda n: not _power_of_two(n)), label="hidden_size")
    else:
        head_dim = None
        hidden = heads * draw(st.sampled_from(DERIVED_HEAD_DIMS), label="derived head_dim")
    num_experts = draw(st.integers(1, 16), label="num_experts")
    layers = draw(st.integers(1, max_layers), label="layers")
    step = draw(st.integers(1, layers), label="decoder_sparse_step")
    mlp_only = draw(st.lists(st.integers(0, layers - 1), unique=True, max_size=layers - 1), label="mlp_only_layers")
    hypothesis.assume(any(i not in mlp_only and (i + 1) % step == 0 for i in range(layers)))  # >= 1 MoE layer
    return moetrt.MoEConfig(
        vocab_size=draw(st.integers(17, 97), label="vocab_size"),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_experts=num_experts,
        num_experts_per_tok=draw(st.integers(1, min(4, num_experts)), label="k"),
        intermediate_size=draw(st.integers(3, 24), label="intermediate_size"),
        scoring=draw(st.sampled_from(["softmax", "sigmoid"]), label="scoring"),
        normalize_topk=draw(st.booleans(), label="normalize_topk"),
        routed_scaling_factor=draw(st.sampled_from([1.0, 2.5]), label="routed_scaling_factor"),
        shared_expert_intermediate_size=draw(st.sampled_from([0, 0, 5, 16]), label="shared_expert_intermediate_size"),
        shared_expert_gate=draw(st.booleans(), label="shared_expert_gate"),
        decoder_sparse_step=step,
        mlp_only_layers=tuple(mlp_only),
        dense_intermediate_size=draw(st.sampled_from([None, 7, 20]), label="dense_intermediate_size"),
        qk_norm=draw(st.sampled_from([None, "head", "full"]), label="qk_norm"),
        attention_bias=draw(st.booleans(), label="attention_bias"),
        sliding_window=draw(st.sampled_from([None, None, 3]), label="sliding_window"),
        tie_word_embeddings=draw(st.booleans(), label="tie_word_embeddings"),
        rope_theta=10000.0,
        max_position_embeddings=MAX_POSITIONS,
    )


@st.composite
def gpt_oss_configs(draw, max_layers: int = 3) -> moetrt.MoEConfig:
    """A :func:`configs` draw made gpt-oss-like: clamped SwiGLU experts (alpha, limit) with biases, a router
    bias, attention sinks, q/k/v/o biases, per-layer full or sliding-window attention, sometimes YaRN."""
    base = draw(configs(max_layers), label="base config")
    layers = base.num_hidden_layers
    layer_types = draw(st.lists(st.sampled_from(["sliding_attention", "full_attention"]), min_size=layers,
                                max_size=layers), label="layer_types")
    attention_bias = draw(st.sampled_from([True, True, False]), label="attention_bias")
    return dataclasses.replace(
        base,
        activation="clamped_swiglu",
        swiglu_alpha=draw(st.sampled_from([1.702, 1.0]), label="swiglu_alpha"),
        # 0.3 clips gate and up of random weights often; 7.0 (the released models') rarely
        swiglu_limit=draw(st.sampled_from([0.3, 7.0]), label="swiglu_limit"),
        expert_bias=draw(st.sampled_from([True, True, False]), label="expert_bias"),
        router_bias=draw(st.sampled_from([True, True, False]), label="router_bias"),
        attention_sinks=draw(st.sampled_from([True, True, False]), label="attention_sinks"),
        attention_bias=attention_bias,
        attention_out_bias=attention_bias,
        sliding_window=draw(st.sampled_from(WINDOWS), label="sliding_window"),
        layer_types=tuple(layer_types),
        rope_scaling=draw(st.sampled_from([None, *YARN]), label="rope_scaling"),
    )


@st.composite
def input_cases(draw) -> tuple[int, int, int, tuple[int, ...]]:
    """(batch, new tokens, past, left padding per row); past 0 is a prefill alone."""
    batch = draw(st.integers(1, 4), label="batch")
    seq = draw(st.integers(1, 9), label="seq")
    past = draw(st.sampled_from([0, 0, 1, 4, 7]), label="past")
    hypothesis.assume((batch, seq, past) != TRACED)
    # each row keeps at least one real token
    pads = draw(st.lists(st.integers(0, past + seq - 1), min_size=batch, max_size=batch), label="left padding")
    return batch, seq, past, tuple(pads)


def _session(folder):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the models are tiny; the machine is shared
    return ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])


def _inputs(cfg, batch, seq, past, pads, seed):
    gen = torch.Generator().manual_seed(seed)
    total = past + seq
    ids = torch.randint(0, cfg.vocab_size, (batch, total), generator=gen)
    mask = torch.ones(batch, total, dtype=torch.long)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def _run_ort(session, cfg, ids, mask, positions, past_feeds):
    batch = ids.shape[0]
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
    for i in range(cfg.num_hidden_layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = (
                past_feeds[f"present.{i}.{kind}"] if past_feeds is not None
                else np.zeros((batch, cfg.num_key_value_heads, 0, cfg.head_dim), np.float32))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def _dense_weights(weights: np.ndarray, indices: np.ndarray, num_experts: int) -> np.ndarray:
    """[T, K] routed weights -> [T, E] (0 where not routed): independent of the order of the k slots."""
    dense = np.zeros((weights.shape[0], num_experts), np.float64)
    np.put_along_axis(dense, indices.astype(np.int64), weights.astype(np.float64), axis=-1)
    return dense


def _check_run(cfg, ref, got, real: np.ndarray, excluded: set[int], what: str) -> set[int]:
    """Compare one forward; ``real`` [B, S] marks unpadded new tokens. Returns the rows to exclude from
    now on (``excluded`` plus rows with a near-tie flip)."""
    seq = real.shape[1]
    excluded = set(excluded)
    gap = tolerance("fp32", "router_gap").atol
    for n, layer in enumerate(cfg.moe_layers):
        ref_idx = ref.router_indices[n].numpy()
        got_idx = got[f"router_indices.{layer}"]
        valid = real.copy()
        valid[sorted(excluded)] = False
        status, gaps = classify(ref.router_logits[n].numpy(), ref_idx, got_idx, scoring=cfg.scoring,
                                gap_tolerance=gap, valid=valid.reshape(-1))
        failures = np.flatnonzero(status == FAILURE)
        assert not failures.size, (
            f"{what} layer {layer}: tokens {failures.tolist()} routed to {got_idx[failures].tolist()}, "
            f"reference {ref_idx[failures].tolist()} (score gaps {gaps[failures].tolist()} >= {gap})")
        ties = np.flatnonzero(status == NEAR_TIE)
        if ties.size:
            event("near-tie router flip: row left out")
            note(f"{what} layer {layer}: near-tie flips at tokens {ties.tolist()}, gaps {gaps[ties].tolist()}")
            excluded |= {int(t) // seq for t in ties}
        matched = (status == MATCH) & ~np.isin(np.arange(status.size) // seq, sorted(excluded))
        weights = check_close(
            _dense_weights(got[f"router_weights.{layer}"], got_idx, cfg.num_experts)[matched],
            _dense_weights(ref.router_weights[n].numpy(), ref_idx, cfg.num_experts)[matched],
            tolerance("fp32", "router_weights"))
        assert weights.ok, f"{what} layer {layer} router weights: {weights}"

    keep = real.copy()
    keep[sorted(excluded)] = False  # [B, S]
    logits = check_close(got["logits"][keep], ref.logits.numpy()[keep], tolerance("fp32", "logits"))
    assert logits.ok, f"{what} logits: {logits}"
    # present covers past + new positions; compare the new ones of kept rows (the past is an input)
    for i in range(cfg.num_hidden_layers):
        for j, kind in enumerate(("key", "value")):
            want = ref.past_key_values[i][j].numpy()[:, :, -seq:]  # [B, kv, S, hd]
            have = got[f"present.{i}.{kind}"][:, :, -seq:]
            kv = check_close(have.transpose(0, 2, 1, 3)[keep], want.transpose(0, 2, 1, 3)[keep],
                             tolerance("fp32", "kv"))
            assert kv.ok, f"{what} present.{i}.{kind}: {kv}"
    return excluded


def _check_case(model, session, case, seed):
    cfg = model.config
    batch, seq, past, pads = case
    ids, mask, positions = _inputs(cfg, batch, seq, past, pads, seed)
    real = mask.numpy().astype(bool)
    excluded: set[int] = set()
    got_past, ref_past = None, None
    with torch.no_grad():
        if past:  # fill the cache with a prefill, then take the step on each side's own cache
            ref = model(ids[:, :past], mask[:, :past], positions[:, :past], output_router=True)
            got = _run_ort(session, cfg, ids[:, :past], mask[:, :past], positions[:, :past], None)
            excluded = _check_run(cfg, ref, got, real[:, :past], excluded, f"prefill of {past}")
            ref_past, got_past = ref.past_key_values, got
        ref = model(ids[:, past:], mask, positions[:, past:], ref_past, output_router=True)
    got = _run_ort(session, cfg, ids[:, past:], mask, positions[:, past:], got_past)
    excluded = _check_run(cfg, ref, got, real[:, past:], excluded, f"{seq} tokens after {past}")
    if len(excluded) == batch:
        event("every row had a near-tie flip")


CORNERS = [
    # one expert (top-1 of 1), shared expert without gate, tied embeddings, explicit head_dim
    moetrt.MoEConfig(vocab_size=31, hidden_size=20, num_hidden_layers=1, num_attention_heads=3,
                     num_key_value_heads=1, head_dim=6, num_experts=1, num_experts_per_tok=1,
                     intermediate_size=9, shared_expert_intermediate_size=5, shared_expert_gate=False,
                     tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=MAX_POSITIONS),
    # k = E = 4, sigmoid without normalize, a dense layer between MoE layers, q/k norm per head
    moetrt.MoEConfig(vocab_size=40, hidden_size=36, num_hidden_layers=3, num_attention_heads=6,
                     num_key_value_heads=2, num_experts=4, num_experts_per_tok=4, intermediate_size=11,
                     scoring="sigmoid", normalize_topk=False, mlp_only_layers=(1,), dense_intermediate_size=7,
                     qk_norm="head", rope_theta=10000.0, max_position_embeddings=MAX_POSITIONS),
    # 16 experts, top-4, every other layer MoE, full q/k norm, gated shared expert, scaled weights
    moetrt.MoEConfig(vocab_size=50, hidden_size=30, num_hidden_layers=2, num_attention_heads=3,
                     num_key_value_heads=3, num_experts=16, num_experts_per_tok=4, intermediate_size=6,
                     decoder_sparse_step=2, qk_norm="full", shared_expert_intermediate_size=16,
                     routed_scaling_factor=2.5, rope_theta=10000.0, max_position_embeddings=MAX_POSITIONS),
]


def test_exported_model_matches_reference(property_settings, tmp_path, record_max):
    """Export a drawn config once; ONNX Runtime matches the model on every drawn input case."""
    profile = property_settings.profile
    ran, exporting = [], []

    @property_settings(ci=EXAMPLES["ci"], slow=EXAMPLES["slow"])
    @example(cfg=CORNERS[0], cases=[(1, 1, 0, (0,)), (3, 4, 4, (0, 4, 7))], seed=1, std=0.3)
    @example(cfg=CORNERS[1], cases=[(4, 7, 0, (6, 0, 2, 0)), (1, 1, 7, (3,))], seed=2, std=0.3)
    @example(cfg=CORNERS[2], cases=[(2, 9, 1, (0, 9)), (1, 1, 0, (0,))], seed=3, std=0.3)
    @given(cfg=configs(MAX_LAYERS[profile]), cases=st.lists(input_cases(), min_size=1, max_size=3),
           seed=st.integers(0, 2**16), std=st.sampled_from([0.1, 0.3]))
    def check(cfg, cases, seed, std):
        note(f"MoEConfig: {cfg.to_dict()}")
        ran.append(len(cases))
        model = moetrt.MoETransformer.from_config(cfg, seed=seed, std=std)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=tmp_path) as work:
            folder = onnx_from_torch(model, Path(work) / "onnx", router_outputs=True, progress=False)
            session = _session(folder)
        exporting.append(time.perf_counter() - start)
        for n, case in enumerate(cases):
            _check_case(model, session, case, seed + n)

    start = time.perf_counter()
    try:
        check()
    finally:  # counts and times, also of an interrupted or failed run
        record_max("property examples (count, seconds)", f"export [{profile}] models", len(ran))
        record_max("property examples (count, seconds)", f"export [{profile}] input cases", sum(ran))
        record_max("property examples (count, seconds)", f"export [{profile}] seconds", time.perf_counter() - start)
        record_max("property examples (count, seconds)", f"export [{profile}] seconds exporting", sum(exporting))


# gpt-oss's own shape: alternating window and full attention, every bias, sinks, YaRN, a clipping limit
GPT_OSS_CORNER = moetrt.MoEConfig(
    vocab_size=45, hidden_size=24, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=6,
    num_experts=5, num_experts_per_tok=2, intermediate_size=10, activation="clamped_swiglu", swiglu_limit=0.3,
    expert_bias=True, router_bias=True, attention_bias=True, attention_out_bias=True, attention_sinks=True,
    sliding_window=2, layer_types=("sliding_attention", "full_attention", "sliding_attention"),
    rope_scaling=YARN[0], rope_theta=10000.0, max_position_embeddings=MAX_POSITIONS,
)


def test_gpt_oss_style_export_matches_reference(property_settings, tmp_path, record_max):
    """The property above for gpt-oss-style configs: every drawn input case runs past the sliding window."""
    profile = property_settings.profile
    ran = []

    @property_settings(ci=GPT_OSS_EXAMPLES["ci"], slow=GPT_OSS_EXAMPLES["slow"])
    @example(cfg=GPT_OSS_CORNER, cases=[(2, 9, 4, (0, 6)), (1, 1, 7, (2,))], seed=4, std=0.3)
    @given(cfg=gpt_oss_configs(MAX_LAYERS[profile]), cases=st.lists(input_cases(), min_size=1, max_size=3),
           seed=st.integers(0, 2**16), std=st.sampled_from([0.1, 0.3]))
    def check(cfg, cases, seed, std):
        note(f"MoEConfig: {cfg.to_dict()}")
        ran.append(len(cases))
        model = moetrt.MoETransformer.from_config(cfg, seed=seed, std=std)
        with tempfile.TemporaryDirectory(dir=tmp_path) as work:
            folder = onnx_from_torch(model, Path(work) / "onnx", router_outputs=True, progress=False)
            session = _session(folder)
        for n, case in enumerate(cases):
            _check_case(model, session, case, seed + n)

    start = time.perf_counter()
    try:
        check()
    finally:
        record_max("property examples (count, seconds)", f"gpt-oss-style [{profile}] models", len(ran))
        record_max("property examples (count, seconds)", f"gpt-oss-style [{profile}] input cases", sum(ran))
        record_max("property examples (count, seconds)", f"gpt-oss-style [{profile}] seconds",
                   time.perf_counter() - start)
