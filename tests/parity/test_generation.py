"""Generation agreement on scripted runners: agreement passes, explained divergences pass, others fail."""

from __future__ import annotations

import numpy as np
import pytest

from moetrt import MoEConfig
from moetrt.parity import TOLERANCES, explain_divergence
from moetrt.parity.generation import greedy_agreement
from moetrt.parity.router import RoutingEvent

CFG = MoEConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                num_experts=4, num_experts_per_tok=2, intermediate_size=4, max_position_embeddings=64)
LOGITS_TOL = TOLERANCES[("fp32", "logits")]
GAP = TOLERANCES[("fp32", "router_gap")].atol
CLEAR = np.log([0.5, 0.3, 0.19, 0.01])  # router logits with a clear gap (0.11) between experts 1 and 2
TIED = np.log([0.4, 0.3, 0.3, 0.0001])  # experts 1 and 2 tie


class ScriptedRunner:
    """Stands in for a Polygraphy runner: ``logits(step)`` [V] and ``route(step)`` (router logits [E], experts [K])."""

    def __init__(self, logits, route=None):
        self.logits, self.route, self.step = logits, route, 0

    def infer(self, feeds, check_inputs=True):
        new, total = feeds["input_ids"].shape[1], feeds["attention_mask"].shape[1]
        assert feeds["past_key_values.0.key"].shape[2] == total - new, "the runner's own cache comes back"
        out = {"logits": np.zeros((1, new, CFG.vocab_size), np.float32)}
        out["logits"][0, -1] = self.logits(self.step)
        out["present.0.key"] = out["present.0.value"] = np.zeros((1, 1, total, 8), np.float32)
        if self.route is not None:
            router_logits, experts = self.route(self.step)
            out["layers.0.router_logits"] = np.tile(np.float32(router_logits), (new, 1))
            out["layers.0.router_indices"] = np.tile(np.int32(experts), (new, 1))
        self.step += 1
        return out


def one_hot(token, value=5.0):
    logits = np.zeros(CFG.vocab_size, np.float32)
    logits[token] = value
    return logits


def run(reference, artifact, steps=5):
    return greedy_agreement(reference, artifact, CFG, prompt=[1, 2, 3], steps=steps, kv_dtype=np.float32,
                            gap_tolerance=GAP, logits_tolerance=LOGITS_TOL)


def test_agreeing_tokens_pass():
    result = run(ScriptedRunner(lambda s: one_hot(s % 8)), ScriptedRunner(lambda s: one_hot(s % 8)))
    assert result.passed and result.diverged_at is None and result.agreement == 1.0
    assert result.reference_tokens == result.artifact_tokens == [0, 1, 2, 3, 4]


def test_unexplained_divergence_fails():
    result = run(ScriptedRunner(lambda s: one_hot(1)), ScriptedRunner(lambda s: one_hot(2 if s == 2 else 1)))
    assert not result.passed
    assert result.diverged_at == 2 and result.explanation is None and result.agreement == 2 / 5
    assert result.reference_tokens == [1, 1, 1] and result.artifact_tokens == [1, 1, 2]
    assert "no router or logits near-tie" in result.message


def test_divergence_on_a_logits_near_tie_is_explained():
    def reference(step):
        logits = one_hot(4)
        logits[6] = 5.0 - 5e-5  # within 2 x atol of the best
        return logits

    result = run(ScriptedRunner(reference), ScriptedRunner(lambda s: one_hot(6 if s == 1 else 4)))
    assert result.passed and result.diverged_at == 1
    assert result.explanation["kind"] == "logit_near_tie" and result.explanation["reference_token"] == 4


def test_divergence_after_a_router_near_tie_is_explained():
    reference = ScriptedRunner(lambda s: one_hot(3), route=lambda s: (TIED, [0, 1]))
    artifact = ScriptedRunner(lambda s: one_hot(5 if s == 3 else 3), route=lambda s: (TIED, [0, 2] if s == 1 else [0, 1]))
    result = run(reference, artifact)
    assert result.passed and result.diverged_at == 3
    assert result.explanation["kind"] == "router_near_tie"
    assert (result.explanation["step"], result.explanation["layer"]) == (1, 0)
    assert "step 1, layer 0" in result.message


def test_a_routing_bug_fails_even_when_the_tokens_agree():
    reference = ScriptedRunner(lambda s: one_hot(3), route=lambda s: (CLEAR, [0, 1]))
    artifact = ScriptedRunner(lambda s: one_hot(3), route=lambda s: (CLEAR, [0, 2] if s == 2 else [0, 1]))
    result = run(reference, artifact)
    assert not result.passed and result.diverged_at is None
    assert result.router_failures[0].step == 2 and "beyond a near-tie at step 2, layer 0" in result.message


def test_routing_differences_after_a_near_tie_are_its_consequences():
    reference = ScriptedRunner(lambda s: one_hot(3), route=lambda s: (TIED if s == 0 else CLEAR, [0, 1]))
    artifact = ScriptedRunner(lambda s: one_hot(3), route=lambda s: (TIED if s == 0 else CLEAR, [0, 2]))
    result = run(reference, artifact)
    assert result.passed and len(result.near_ties) == 3 and not result.router_failures  # prompt has 3 tokens


def test_explain_divergence_directly():
    ref = np.array([1.0, 3.0, 2.9999], np.float32)
    assert explain_divergence(0, ref, 2, [], LOGITS_TOL)["kind"] == "logit_near_tie"
    assert explain_divergence(0, ref, 0, [], LOGITS_TOL) is None  # 2.0 below the best: no excuse
    event = RoutingEvent(0, [0, 1], [0, 2], 1e-7, True, step=4, layer=2)
    assert explain_divergence(5, ref, 0, [event], LOGITS_TOL)["step"] == 4


def test_empty_prompt_is_an_error():
    with pytest.raises(ValueError, match="prompt is empty"):
        greedy_agreement(None, None, CFG, prompt=[], steps=1, kv_dtype=np.float32, gap_tolerance=GAP,
                         logits_tolerance=LOGITS_TOL)
