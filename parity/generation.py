"""Generation agreement: greedy tokens over N steps, each side feeding back its own KV cache.

The reference and the artifact generate from the same prompt (batch 1). While their tokens agree,
each step's expert choices are compared too (:mod:`moetrt.parity.router`). When the tokens first
differ at step ``s``, the divergence is

- **explained by a router near-tie** if a near-tie flip happened at some step ``<= s`` (the first
  one is named: step, layer, token), since a flipped expert legitimately changes the hidden state
  and every later step;
- **explained by a logits near-tie** if the artifact's token is within tolerance of the
  reference's best at step ``s``: ``ref[best] - ref[chosen] <= 2 * max(atol, rtol * |ref[best]|)``
  (each side may be off by one tolerance);
- a **failure** otherwise. A routing mismatch beyond a near-tie before any near-tie is a failure too.

Step 0 is the prompt's forward pass (prefill); step ``s`` feeds the token chosen at step ``s - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moetrt.config import MoEConfig
from moetrt.state import state_contract

from .router import FAILURE, MAX_EVENTS, NEAR_TIE, RoutingEvent, classify, layer_selection
from .tolerances import Tolerance

__all__ = ["GenerationResult", "greedy_agreement", "explain_divergence"]


@dataclass
class GenerationResult:
    steps: int
    prompt: list[int]
    reference_tokens: list[int] = field(default_factory=list)
    artifact_tokens: list[int] = field(default_factory=list)
    diverged_at: int | None = None
    explanation: dict | None = None  # {"kind": "router_near_tie" | "logit_near_tie", ...}
    near_ties: list[RoutingEvent] = field(default_factory=list)  # router near-ties seen while generating
    router_failures: list[RoutingEvent] = field(default_factory=list)
    passed: bool = True
    message: str = ""

    @property
    def agreement(self) -> float:
        """Fraction of the generated steps whose tokens agree."""
        agreed = self.diverged_at if self.diverged_at is not None else len(self.reference_tokens)
        return agreed / self.steps if self.steps else 1.0

    def to_dict(self) -> dict:
        return {
            "steps": self.steps, "prompt": self.prompt, "reference_tokens": self.reference_tokens,
            "artifact_tokens": self.artifact_tokens, "agreement": self.agreement, "diverged_at": self.diverged_at,
            "explanation": self.explanation, "near_ties": [e.to_dict() for e in self.near_ties[:MAX_EVENTS]],
            "router_failures": [e.to_dict() for e in self.router_failures[:MAX_EVENTS]],
            "passed": self.passed, "message": self.message,
        }


def explain_divergence(step: int, reference_logits: np.ndarray, artifact_token: int, near_ties: list[RoutingEvent],
                       logits_tolerance: Tolerance) -> dict | None:
    """Why the artifact chose ``artifact_token`` at ``step`` (``reference_logits`` [V]), or None if nothing explains it."""
    if near_ties:
        first = near_ties[0]
        return {"kind": "router_near_tie", "step": first.step, "layer": first.layer, "token": first.token,
                "gap": first.gap, "reference": first.reference, "artifact": first.artifact}
    ref = np.asarray(reference_logits, dtype=np.float64)
    best = int(np.argmax(ref))
    gap = float(ref[best] - ref[artifact_token])
    allowed = 2.0 * max(logits_tolerance.atol, logits_tolerance.rtol * abs(float(ref[best])))
    if gap <= allowed:
        return {"kind": "logit_near_tie", "step": step, "gap": gap, "allowed": allowed,
                "reference_token": best, "artifact_token": int(artifact_token)}
    return None


def _step_feeds(config: MoEConfig, tokens: list[int], total: int, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    new = len(tokens)
    feeds = {
        "input_ids": np.asarray([tokens], dtype=np.int64),
        "attention_mask": np.ones((1, total), dtype=np.int64),
        "position_ids": np.arange(total - new, total, dtype=np.int64)[None],
    }
    for present, past_name in state_contract(config).pairs():
        feeds[past_name] = past[present]
    return feeds


def _empty_past(config: MoEConfig, dtype) -> dict[str, np.ndarray]:
    """The state of a batch-1 prompt before its prefill, keyed by the present names that step feeds back;
    ``dtype`` is the model dtype's NumPy dtype (entries kept in fp32 stay float32)."""
    state = state_contract(config)
    empty = state.empty_past(1)
    return {present: np.zeros(empty[past], dtype=dtype if state.entry_of(past)[1].dtype == "model" else np.float32)
            for present, past in state.pairs()}


def greedy_agreement(
    reference, artifact, config: MoEConfig, *, prompt: list[int], steps: int, kv_dtype,
    gap_tolerance: float, logits_tolerance: Tolerance,
) -> GenerationResult:
    """Greedy-decode ``steps`` tokens on both active runners and compare (see the module docstring).

    ``reference``/``artifact``: active Polygraphy runners with the graph's I/O names; router
    checkpoints (``layers.{i}.router_logits|router_indices``) are compared when both return them.
    """
    if not prompt:
        raise ValueError("the generation prompt is empty: give at least one token")
    result = GenerationResult(steps=steps, prompt=list(prompt))
    past_ref, past_art = _empty_past(config, np.float32), _empty_past(config, kv_dtype)
    tokens = list(prompt)
    total = len(tokens)
    for step in range(steps):
        out_ref = reference.infer(_step_feeds(config, tokens, total, past_ref), check_inputs=False)
        out_art = artifact.infer(_step_feeds(config, tokens, total, past_art), check_inputs=False)
        past_ref = {k: np.array(v) for k, v in out_ref.items() if k.startswith("present.")}
        past_art = {k: np.array(v) for k, v in out_art.items() if k.startswith("present.")}
        for layer in config.moe_layers:
            names = (f"layers.{layer}.router_logits", f"layers.{layer}.router_indices")
            if not all(n in out_ref and n in out_art for n in names):
                continue
            status, gaps = classify(out_ref[names[0]], out_ref[names[1]], out_art[names[1]],
                                    **layer_selection(config, layer, getattr(reference, "model", None)),
                                    gap_tolerance=gap_tolerance)
            # after a near-tie (an earlier step or layer), later differences are its consequences
            after_near_tie = bool(result.near_ties)
            for t in np.flatnonzero((status == NEAR_TIE) | (status == FAILURE)):
                event = RoutingEvent(int(t), np.asarray(out_ref[names[1]])[t].tolist(),
                                     np.asarray(out_art[names[1]])[t].tolist(), float(gaps[t]),
                                     bool(status[t] == NEAR_TIE), step=step, layer=layer)
                if status[t] == FAILURE and not after_near_tie:
                    result.router_failures.append(event)
                elif status[t] == NEAR_TIE:
                    result.near_ties.append(event)
        ref_logits = np.asarray(out_ref["logits"])[0, -1]  # [V]
        ref_token = int(np.argmax(ref_logits))
        art_token = int(np.argmax(np.asarray(out_art["logits"])[0, -1]))
        result.reference_tokens.append(ref_token)
        result.artifact_tokens.append(art_token)
        if ref_token != art_token:
            result.diverged_at = step
            result.explanation = explain_divergence(step, ref_logits, art_token, result.near_ties, logits_tolerance)
            break
        tokens = [ref_token]
        total += 1

    if result.router_failures:
        first = result.router_failures[0]
        result.passed = False
        result.message = (f"routing disagrees beyond a near-tie at step {first.step}, layer {first.layer}, "
                          f"token {first.token}: reference experts {first.reference}, artifact {first.artifact} "
                          f"(score gap {first.gap:.2e})")
    elif result.diverged_at is None:
        result.message = f"all {steps} greedy tokens agree"
    elif result.explanation is None:
        result.passed = False
        s = result.diverged_at
        result.message = (f"greedy tokens diverge at step {s} (reference {result.reference_tokens[s]}, artifact "
                          f"{result.artifact_tokens[s]}) with no router or logits near-tie to explain it")
    else:
        e = result.explanation
        where = (f"a router near-tie at step {e['step']}, layer {e['layer']} (gap {e['gap']:.2e})"
                 if e["kind"] == "router_near_tie" else f"a logits near-tie (gap {e['gap']:.2e} <= {e['allowed']:.2e})")
        result.message = f"greedy tokens diverge at step {result.diverged_at}, explained by {where}"
    return result
