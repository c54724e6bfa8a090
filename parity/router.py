"""Router agreement: expert sets per token, tie-aware.

For each token the reference's chosen experts and the artifact's are compared as sets (the order
inside the k chosen never matters). A token whose sets differ is

- a **near-tie** (reported, allowed) when the reference's score gap between its k-th and
  (k+1)-th expert is below the dtype's ``router_gap`` tolerance AND every expert swapped in or out
  lies within that gap of the boundary, so the artifact only broke a (near) tie the other way;
- a **failure** otherwise: the artifact routed the token to an expert the reference ranks clearly
  below its k-th choice.

Scores are what ``TopKRouting`` ranks, computed here in float64 from the reference's float32 router
logits: ``softmax(logits)`` or ``sigmoid(logits)``, plus the layer's selection bias, ``-inf`` outside
the groups the reference kept (version 2: DeepSeek-V3 and kin). The gap is measured on these
selection scores, not on the weights (which come from the unbiased scores). A token whose groups
differ from the reference's is a failure: its experts lie outside the reference's kept groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["RouterLayerResult", "RoutingEvent", "router_scores", "selection_scores", "layer_selection",
           "boundary_gap", "classify", "router_agreement", "near_tie_events",
           "MATCH", "NEAR_TIE", "FAILURE", "IGNORED", "MAX_EVENTS"]

MAX_EVENTS = 20  # events kept per layer in a report (the counts are always complete)


@dataclass
class RoutingEvent:
    """One token whose expert set differs from the reference's."""

    token: int  # row of the [T, E] router logits (T = batch * new tokens, row-major)
    reference: list[int]  # the reference's experts, best first
    artifact: list[int]  # the artifact's experts, as it ordered them
    gap: float  # the reference's score gap between its k-th and (k+1)-th expert
    near_tie: bool
    input: int = 0  # which input (iteration) of the comparison
    step: int | None = None  # generation step, for events seen while generating
    layer: int | None = None

    def to_dict(self) -> dict:
        return {"layer": self.layer, "input": self.input, "step": self.step, "token": self.token,
                "reference": self.reference,
                "artifact": self.artifact, "gap": self.gap, "near_tie": self.near_tie}


@dataclass
class RouterLayerResult:
    layer: int
    tokens: int = 0
    matches: int = 0  # expert sets equal
    near_ties: int = 0
    failures: int = 0
    events: list[RoutingEvent] = field(default_factory=list)  # the first MAX_EVENTS mismatches

    @property
    def agreement(self) -> float:
        """Fraction of tokens whose expert set equals the reference's (1.0 for no tokens)."""
        return self.matches / self.tokens if self.tokens else 1.0

    @property
    def passed(self) -> bool:
        return self.failures == 0

    def merge(self, other: "RouterLayerResult") -> None:
        assert other.layer == self.layer
        self.tokens += other.tokens
        self.matches += other.matches
        self.near_ties += other.near_ties
        self.failures += other.failures
        self.events = (self.events + other.events)[:MAX_EVENTS]

    def to_dict(self) -> dict:
        return {"layer": self.layer, "tokens": self.tokens, "agreement": self.agreement, "matches": self.matches,
                "near_ties": self.near_ties, "failures": self.failures, "passed": self.passed,
                "events": [e.to_dict() for e in self.events]}


def router_scores(logits: np.ndarray, scoring: str) -> np.ndarray:
    """The scores TopKRouting ranks, float64 [T, E].

    sparsemixer picks the largest logit, then the largest other one: the softmax's order, so its
    choices are ranked (and near-ties measured) on the softmax.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if scoring == "sparsemixer":
        scoring = "softmax"
    if scoring == "softmax":
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)
    if scoring == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    raise ValueError(f"scoring must be softmax or sigmoid, got {scoring!r}")


def selection_scores(
    logits: np.ndarray, scoring: str, selection_bias: np.ndarray | None = None, n_group: int = 1,
    topk_group: int = 1, group_scoring: str = "top2_sum",
) -> np.ndarray:
    """The scores TopKRouting chooses by, float64 [T, E]: :func:`router_scores` plus ``selection_bias``
    [E], ``-inf`` outside each token's ``topk_group`` best of ``n_group`` groups."""
    from moetrt.ops.topk_routing import check_routing, selection_scores_reference

    scores = router_scores(logits, scoring)  # [T, E]
    num_experts = scores.shape[-1]
    k = 2 if scoring == "sparsemixer" else 1  # the k the scoring allows; the layer's own k is checked by classify
    check_routing(num_experts, k, scoring, n_group, topk_group, group_scoring)
    bias = None if selection_bias is None else np.asarray(selection_bias, dtype=np.float64).reshape(-1)
    if bias is not None and bias.shape != (num_experts,):
        raise ValueError(f"selection_bias must be [E={num_experts}], got {list(np.shape(selection_bias))}")
    return selection_scores_reference(scores, bias, n_group, topk_group, group_scoring)


def layer_selection(config, layer: int, model=None) -> dict:
    """How MoE layer ``layer`` chooses its experts, as keywords of :func:`classify`: the config's
    scoring and groups, and the reference ``model``'s ``layers.{layer}.mlp.selection_bias`` [E] where
    the config has one."""
    options = {"scoring": config.scoring}
    if getattr(config, "n_group", 1) > 1:
        options.update(n_group=config.n_group, topk_group=config.topk_group, group_scoring=config.group_scoring)
    if getattr(config, "selection_bias", False):
        if model is None:
            raise ValueError(f"layer {layer} routes with a selection bias: pass the reference model, whose "
                             f"layers.{layer}.mlp.selection_bias holds it")
        bias = model.get_parameter(f"layers.{layer}.mlp.selection_bias")
        options["selection_bias"] = bias.detach().float().cpu().numpy()
    return options


def boundary_gap(scores: np.ndarray, k: int) -> np.ndarray:
    """Per token, the k-th largest score minus the (k+1)-th [T]; +inf when k equals the number of experts."""
    if k >= scores.shape[-1]:
        return np.full(scores.shape[0], np.inf)
    ordered = -np.sort(-scores, axis=-1)  # descending
    return ordered[:, k - 1] - ordered[:, k]


MATCH, NEAR_TIE, FAILURE, IGNORED = 0, 1, 2, -1


def classify(
    reference_logits: np.ndarray, reference_indices: np.ndarray, artifact_indices: np.ndarray, *,
    scoring: str, gap_tolerance: float, valid: np.ndarray | None = None, selection_bias: np.ndarray | None = None,
    n_group: int = 1, topk_group: int = 1, group_scoring: str = "top2_sum",
) -> tuple[np.ndarray, np.ndarray]:
    """Per token: status (MATCH, NEAR_TIE, FAILURE; IGNORED where ``valid`` [T] is False) [T] and the
    reference's boundary gap [T], on the selection scores (:func:`selection_scores`)."""
    ref = np.asarray(reference_indices, dtype=np.int64)
    art = np.asarray(artifact_indices, dtype=np.int64)
    if ref.shape != art.shape:
        raise ValueError(f"router indices of different shapes: reference {ref.shape}, artifact {art.shape}")
    scores = selection_scores(reference_logits, scoring, selection_bias, n_group, topk_group, group_scoring)  # [T, E]
    if scores.shape[0] != ref.shape[0]:
        raise ValueError(f"{scores.shape[0]} router logit rows for {ref.shape[0]} tokens")
    num_experts, k = scores.shape[1], ref.shape[1]
    gaps = boundary_gap(scores, k)  # [T]
    kth = -np.sort(-scores, axis=-1)[:, k - 1]  # [T] the reference's k-th score
    status = np.full(ref.shape[0], MATCH, dtype=np.int8)
    if valid is not None:
        status[~np.asarray(valid, dtype=bool).reshape(-1)] = IGNORED
    for t in range(ref.shape[0]):
        if status[t] == IGNORED:
            continue
        ref_set, art_set = set(ref[t].tolist()), set(art[t].tolist())
        if ref_set == art_set:
            continue
        valid = len(art_set) == k and all(0 <= e < num_experts for e in art_set)
        near = (
            valid
            and gaps[t] < gap_tolerance
            and all(kth[t] - scores[t, e] < gap_tolerance for e in art_set - ref_set)  # swapped in: near the boundary
            and all(scores[t, e] - kth[t] < gap_tolerance for e in ref_set - art_set)  # swapped out: near it too
        )
        status[t] = NEAR_TIE if near else FAILURE
    return status, gaps


def router_agreement(
    layer: int,
    reference_logits: np.ndarray,
    reference_indices: np.ndarray,
    artifact_indices: np.ndarray,
    *,
    scoring: str,
    gap_tolerance: float,
    input_index: int = 0,
    step: int | None = None,
    forced: dict[int, RoutingEvent] | None = None,
    valid: np.ndarray | None = None,
    **selection,
) -> RouterLayerResult:
    """Compare one layer's expert choices; ``*_indices`` are [T, K], ``reference_logits`` [T, E].

    ``forced``: token -> the near-tie event for which the reference was made to follow the
    artifact's choice; such tokens count as near-ties (as first seen), not as matches.
    ``valid`` [T]: the tokens to compare (padding is not); default all. ``selection``: the layer's
    selection bias and groups, as :func:`classify` takes them (see :func:`layer_selection`).
    """
    status, gaps = classify(reference_logits, reference_indices, artifact_indices,
                            scoring=scoring, gap_tolerance=gap_tolerance, valid=valid, **selection)
    ref = np.asarray(reference_indices, dtype=np.int64)
    art = np.asarray(artifact_indices, dtype=np.int64)
    forced = forced or {}
    result = RouterLayerResult(layer, tokens=int((status != IGNORED).sum()))
    for t in range(len(status)):
        if status[t] == IGNORED:
            continue
        if t in forced and status[t] == MATCH:
            event = forced[t]
        elif status[t] == MATCH:
            result.matches += 1
            continue
        else:
            event = RoutingEvent(t, ref[t].tolist(), art[t].tolist(), float(gaps[t]), bool(status[t] == NEAR_TIE),
                                 input_index, step, layer)
        result.near_ties += event.near_tie
        result.failures += not event.near_tie
        if len(result.events) < MAX_EVENTS:
            result.events.append(event)
    return result


def near_tie_events(
    layer: int, reference_logits, reference_indices, artifact_indices, *, scoring: str, gap_tolerance: float,
    input_index: int = 0, step: int | None = None, valid: np.ndarray | None = None, **selection,
) -> dict[int, RoutingEvent]:
    """token -> event for every near-tie token of one layer (not capped); ``selection`` as for :func:`classify`."""
    status, gaps = classify(reference_logits, reference_indices, artifact_indices,
                            scoring=scoring, gap_tolerance=gap_tolerance, valid=valid, **selection)
    ref = np.asarray(reference_indices, dtype=np.int64)
    art = np.asarray(artifact_indices, dtype=np.int64)
    return {int(t): RoutingEvent(int(t), ref[t].tolist(), art[t].tolist(), float(gaps[t]), True, input_index, step, layer)
            for t in np.flatnonzero(status == NEAR_TIE)}
