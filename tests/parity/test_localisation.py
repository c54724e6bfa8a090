"""Failing cases: each injected bug is caught, and the first divergence names its layer and op kind.

The bugs (tests/parity/broken.py) go into copies of the canonical fp32 export of the shipped tiny
model (4 MoE layers, 8 experts, top-2, renormalised). Checkpoints before the bug must still pass:
localisation is only right if it is not merely "everything failed".
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moetrt.parity import compare, default_inputs

from . import broken

pytest.importorskip("polygraphy")
pytest.importorskip("onnxruntime")


def busiest_expert(model, layer: int) -> int:
    """The expert of ``layer`` that the default inputs route most tokens to (so perturbing it shows)."""
    feed = default_inputs(model)[0]
    with torch.no_grad():
        out = model(torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"]),
                    torch.from_numpy(feed["position_ids"]), output_router=True)
    indices = out.router_indices[model.config.moe_layers.index(layer)].numpy()
    return int(np.bincount(indices.reshape(-1)).argmax())


# name -> (bug(proto, model), first failing checkpoint, its layer, its op kind)
BUGS = {
    "perturbed expert weight in layer 2": (
        lambda proto, model: broken.perturb_expert(proto, 2, busiest_expert(model, 2), scale=0.05),
        "layers.2.experts", 2, "experts"),
    "flipped normalize on layer 1's router": (
        lambda proto, model: broken.flip_normalize(proto, 1),
        "layers.1.router_weights", 1, "router"),
    "swapped gate/up halves in layer 3": (
        lambda proto, model: broken.swap_gate_up(proto, 3),
        "layers.3.experts", 3, "experts"),
    "perturbed post-attention norm in layer 1": (
        lambda proto, model: broken.perturb_norm(proto, r"layers\.1\.post_attention_layernorm\.weight$", 0.5),
        "layers.1.post_attention_norm", 1, "norm"),
    "perturbed final norm": (
        lambda proto, model: broken.perturb_norm(proto, r"^model\.norm\.weight$", 1.0),
        "norm.output", None, "norm"),
    "rope theta x10": (
        lambda proto, model: broken.wrong_rope_theta(proto, model.config.head_dim, model.config.rope_theta * 10),
        "present.0.key", 0, "attention"),
}


@pytest.fixture(scope="module")
def broken_reports(parity_export, tmp_path_factory):
    """bug name -> parity report of the tiny export with that bug (each computed once)."""
    import shutil

    import onnx

    model, folder = parity_export("tiny")
    reports = {}

    def get(name):
        if name not in reports:
            bug = BUGS[name][0]
            out = tmp_path_factory.mktemp("broken") / "onnx"
            shutil.copytree(folder, out)
            proto = onnx.load(str(out / "model.onnx"))
            bug(proto, model)
            onnx.save(proto, str(out / "model.onnx"))
            reports[name] = compare(model, out, steps=16)
        return reports[name]

    return get


@pytest.mark.parametrize("name", list(BUGS))
def test_bug_is_caught_and_localised(broken_reports, name):
    _, checkpoint, layer, kind = BUGS[name]
    report = broken_reports(name)
    result = report.backends["ort"]
    assert not report.passed and report.exit_code == 4
    first = result.first_failure
    assert (first.name, first.layer, first.kind) == (checkpoint, layer, kind), report.summary()
    where = kind if layer is None else f"layer {layer} {kind}"
    assert result.failures[0].startswith(f"first divergence: {where} ({checkpoint})")
    before = result.checkpoints[: result.checkpoints.index(first)]
    assert before and all(c.passed for c in before)
    logits = next(c for c in result.checkpoints if c.name == "logits")
    assert not logits.passed, "the bug shows in the logits too"


def test_router_weights_check_fails_on_normalize(broken_reports):
    result = broken_reports("flipped normalize on layer 1's router").backends["ort"]
    checks = {c.name: c for c in result.checkpoints}
    assert checks["layers.1.router_logits"].passed and checks["layers.1.router_indices"].passed
    assert not checks["layers.1.router_weights"].passed


def test_kv_check_fails_on_rope(broken_reports):
    result = broken_reports("rope theta x10").backends["ort"]
    checks = {c.name: c for c in result.checkpoints}
    assert not checks["present.0.key"].passed and checks["present.0.value"].passed  # RoPE rotates keys only
    assert checks["layers.0.input_norm"].passed


def test_generation_check_fails_on_an_unexplained_divergence(broken_reports):
    """The final norm's bug leaves routing alone and changes a greedy token within 16 steps."""
    generation = broken_reports("perturbed final norm").backends["ort"].generation
    assert not generation.passed and generation.diverged_at is not None and generation.explanation is None
    assert not generation.router_failures


def test_generation_check_fails_on_routing(broken_reports):
    generation = broken_reports("rope theta x10").backends["ort"].generation
    assert not generation.passed and generation.router_failures and generation.router_failures[0].step == 0


def test_without_localisation_only_graph_outputs_are_compared(parity_export, broken_copy):
    model, folder = parity_export("tiny")
    out = broken_copy(folder, lambda p: broken.swap_gate_up(p, 3))
    report = compare(model, out, steps=0, localize=False)
    result = report.backends["ort"]
    assert not report.passed
    assert result.first_failure.name == "logits"  # the KV caches of layer 3 are written before its experts
    assert {c.point for c in result.checkpoints} == {"logits", "present.key", "present.value"}
    assert "layers.3.experts" in result.missing_checkpoints


# --- routing bugs on a model built to have (near-)ties ------------------------------------------
# E = 4 experts, top-2. In layer 1, experts 0 and 3 are +/- a along u and experts 1 and 2 both point
# along w (orthogonal to u): one of 0/3 always wins, and 1 and 2 tie for the second place.
def tie_model(epsilon: float, seed: int = 3):
    import moetrt

    cfg = moetrt.MoEConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                           num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, intermediate_size=24,
                           max_position_embeddings=128, rope_theta=10000.0)
    model = moetrt.MoETransformer.from_config(cfg, seed=seed, std=0.2)
    set_tie_gate(model, epsilon)
    return model


def set_tie_gate(model, epsilon: float) -> torch.Tensor:
    """Layer 1's router rows: expert 2 = (1 + epsilon) x expert 1."""
    generator = torch.Generator().manual_seed(1)
    u, w = torch.randn(32, generator=generator), torch.randn(32, generator=generator)
    u /= u.norm()
    w = w - (w @ u) * u
    w /= w.norm()
    with torch.no_grad():
        gate = model.layers[1].mlp.gate.weight  # [E, D]
        gate[0], gate[3], gate[1], gate[2] = 4 * u, -4 * u, 2 * w, 2 * (1 + epsilon) * w
    return gate.detach().clone()


@pytest.fixture(scope="module")
def tie_export(tmp_path_factory):
    """One export of the tie model; each test writes its own gate rows into a copy."""
    from moetrt.export import onnx_from_torch

    folder = tmp_path_factory.mktemp("ties") / "onnx"
    onnx_from_torch(tie_model(0.0), folder, progress=False)
    return folder


def with_gate(proto, rows: torch.Tensor):
    broken.set_initializer(proto, r"layers\.1\.mlp\.gate\.weight$", rows.numpy())


def test_router_in_fp16_with_forced_ties_fails_at_the_router(tie_export, broken_copy):
    """Rounding router logits to fp16 merges experts 1 and 2 (2e-4 apart) into exact ties, which go to
    expert 1 where the reference, with a score gap above router_gap, chose expert 2."""
    model = tie_model(2e-4)
    rows = model.layers[1].mlp.gate.weight.detach()
    out = broken_copy(tie_export, lambda p: (with_gate(p, rows), broken.router_in_fp16(p, 1)))
    report = compare(model, out, steps=8)
    result = report.backends["ort"]
    assert not report.passed
    first = result.first_failure
    assert (first.layer, first.kind) == (1, "router"), report.summary()
    layer1 = next(r for r in result.router if r.layer == 1)
    assert layer1.failures >= 1 and not layer1.passed
    failed = [e for e in layer1.events if not e.near_tie]
    assert all(set(e.reference) ^ set(e.artifact) == {1, 2} and e.gap >= 1e-5 for e in failed)
    assert all(r.passed for r in result.router if r.layer == 0)


def test_a_routing_bug_with_identical_router_logits_fails(parity_export, broken_copy):
    """TopK picking the smallest scores: router logits agree, the expert choice does not."""
    model, folder = parity_export("tiny")

    def lowest(proto):
        function = next(f for f in proto.functions if f.name == "TopKRouting")
        topk = next(n for n in function.node if n.op_type == "TopK")
        next(a for a in topk.attribute if a.name == "largest").i = 0

    report = compare(model, broken_copy(folder, lowest), steps=0)
    result = report.backends["ort"]
    first = result.first_failure
    assert (first.name, first.kind) == ("layers.0.router_indices", "router")
    assert next(c for c in result.checkpoints if c.name == "layers.0.router_logits").passed
    assert result.router[0].failures == result.router[0].tokens
    assert "routed to other experts beyond a near-tie" in " ".join(result.failures)


def test_exact_ties_agree(tie_export, broken_copy):
    """Experts 1 and 2 identical: both sides break the tie to the lower index, nothing to report."""
    model = tie_model(0.0)
    report = compare(model, tie_export, steps=8)
    assert report.passed, report.summary()
    layer1 = next(r for r in report.backends["ort"].router if r.layer == 1)
    assert layer1.agreement == 1.0 and layer1.near_ties == 0


def test_near_ties_are_reported_not_failed(tie_export, broken_copy):
    """The reference sees expert 2 a hair (1e-6 relative) above expert 1; the artifact sees an exact tie
    and takes expert 1. Those tokens are near-ties: reported, followed by the reference, and passed."""
    model = tie_model(1e-6)
    exact = tie_model(0.0).layers[1].mlp.gate.weight.detach()
    out = broken_copy(tie_export, lambda p: with_gate(p, exact))
    report = compare(model, out, steps=12, seq=24)
    result = report.backends["ort"]
    assert report.passed, report.summary()
    layer1 = next(r for r in result.router if r.layer == 1)
    assert layer1.near_ties >= 1 and layer1.failures == 0 and layer1.agreement < 1.0
    assert all(e.near_tie and e.gap < 1e-5 and set(e.reference) ^ set(e.artifact) == {1, 2} for e in layer1.events)
    # experts 1 and 2 have different weights: the outputs match because the reference followed the flips
    assert all(c.passed for c in result.checkpoints)
    generation = result.generation
    assert generation.passed
    if generation.diverged_at is not None:
        assert generation.explanation["kind"] == "router_near_tie" and generation.explanation["layer"] == 1
