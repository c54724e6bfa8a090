"""Router agreement on constructed router logits: exact and near ties are reported, routing bugs fail."""

from __future__ import annotations

import numpy as np
import pytest

from moetrt.ops.topk_routing import topk_routing_reference
from moetrt.parity import boundary_gap, classify, router_agreement, router_scores
from moetrt.parity.router import FAILURE, IGNORED, MATCH, NEAR_TIE

GAP = 1e-5  # the fp32 router_gap tolerance


def _logits(rows):
    """Router logits whose softmax scores are proportional to ``rows`` (so gaps are easy to read)."""
    return np.log(np.asarray(rows, dtype=np.float64)).astype(np.float32)


# reference scores (before softmax normalisation, they sum to 1 already), k = 2
SCORES = [
    [0.4, 0.3, 0.3, 0.0001],  # 0: exact tie between experts 1 and 2 at the boundary
    [0.4, 0.3, 0.3 - 4e-6, 0.0001 + 4e-6],  # 1: near tie, gap 4e-6 < 1e-5
    [0.5, 0.3, 0.19, 0.01],  # 2: clear gap 0.11
    [0.5, 0.25, 0.25 - 1e-6, 1e-12],  # 3: near tie at the boundary, expert 3 far below
    [0.25, 0.25, 0.25, 0.25],  # 4: all four tied
]


def test_scores_and_gaps():
    logits = _logits([[0.5, 0.3, 0.19, 0.01]])
    np.testing.assert_allclose(router_scores(logits, "softmax"), [[0.5, 0.3, 0.19, 0.01]], rtol=1e-6)
    assert boundary_gap(router_scores(logits, "softmax"), 2)[0] == pytest.approx(0.11, rel=1e-5)
    assert boundary_gap(router_scores(logits, "softmax"), 4)[0] == np.inf  # k = E: nothing to tie with
    np.testing.assert_allclose(router_scores(np.zeros((1, 3)), "sigmoid"), [[0.5, 0.5, 0.5]])


def test_same_sets_in_any_order_match():
    logits = _logits(SCORES)
    _, ref = topk_routing_reference(logits, 2)
    status, _ = classify(logits, ref, ref[:, ::-1], scoring="softmax", gap_tolerance=GAP)
    assert (status == MATCH).all()


def test_exact_and_near_ties_broken_the_other_way_are_near_ties():
    logits = _logits(SCORES[:2])
    _, ref = topk_routing_reference(logits, 2)
    assert ref[:, :1].tolist() == [[0], [0]] and ref[0, 1] == 1  # ties go to the lower expert index
    artifact = np.array([[0, 2], [2, 0]])  # picks expert 2 instead of 1 on both tokens
    result = router_agreement(3, logits, ref, artifact, scoring="softmax", gap_tolerance=GAP)
    assert (result.tokens, result.matches, result.near_ties, result.failures) == (2, 0, 2, 0)
    assert result.passed and result.agreement == 0.0
    assert [e.near_tie for e in result.events] == [True, True]
    assert result.events[0].gap == pytest.approx(0.0, abs=1e-7) and result.events[1].layer == 3


def test_a_clear_gap_routed_the_other_way_fails():
    logits = _logits(SCORES[2:3])
    result = router_agreement(0, logits, [[0, 1]], [[0, 2]], scoring="softmax", gap_tolerance=GAP)
    assert (result.near_ties, result.failures) == (0, 1)
    assert not result.passed
    assert result.events[0].gap == pytest.approx(0.11, rel=1e-4)


def test_a_small_boundary_gap_does_not_excuse_a_far_away_expert():
    """Token 3's k-th and (k+1)-th experts nearly tie, but the artifact picked expert 3 (score 0):
    a routing bug hiding behind a near-tie still fails."""
    logits = _logits(SCORES[3:4])
    ref = [[0, 1]]
    assert classify(logits, ref, [[0, 2]], scoring="softmax", gap_tolerance=GAP)[0].tolist() == [NEAR_TIE]
    assert classify(logits, ref, [[0, 3]], scoring="softmax", gap_tolerance=GAP)[0].tolist() == [FAILURE]
    assert classify(logits, ref, [[2, 3]], scoring="softmax", gap_tolerance=GAP)[0].tolist() == [FAILURE]


def test_all_tied_any_choice_is_a_near_tie():
    logits = _logits(SCORES[4:5])
    for artifact in ([[2, 3]], [[3, 1]], [[0, 2]]):
        assert classify(logits, [[0, 1]], artifact, scoring="softmax", gap_tolerance=GAP)[0].tolist() == [NEAR_TIE]


def test_the_gap_tolerance_decides():
    logits = _logits(SCORES[2:3])  # gap 0.11
    assert classify(logits, [[0, 1]], [[0, 2]], scoring="softmax", gap_tolerance=0.2)[0].tolist() == [NEAR_TIE]
    assert classify(logits, [[0, 1]], [[0, 2]], scoring="softmax", gap_tolerance=0.1)[0].tolist() == [FAILURE]


def test_invalid_artifact_choices_fail():
    logits = _logits(SCORES[4:5])  # even with every expert tied
    assert classify(logits, [[0, 1]], [[0, 7]], scoring="softmax", gap_tolerance=GAP)[0].tolist() == [FAILURE]
    assert classify(logits, [[0, 1]], [[2, 2]], scoring="softmax", gap_tolerance=GAP)[0].tolist() == [FAILURE]


def test_sigmoid_scoring_ranks_by_sigmoid():
    logits = np.array([[2.0, 0.5, 0.5 - 1e-6, -3.0]], dtype=np.float32)  # sigmoid gap ~2.4e-7
    assert classify(logits, [[0, 1]], [[0, 2]], scoring="sigmoid", gap_tolerance=GAP)[0].tolist() == [NEAR_TIE]
    assert classify(logits, [[0, 1]], [[0, 3]], scoring="sigmoid", gap_tolerance=GAP)[0].tolist() == [FAILURE]


def test_padding_tokens_are_not_counted():
    logits = _logits(SCORES[2:3] * 2)
    result = router_agreement(0, logits, [[0, 1], [0, 1]], [[0, 2], [0, 1]], scoring="softmax", gap_tolerance=GAP,
                              valid=np.array([False, True]))
    assert (result.tokens, result.matches, result.failures) == (1, 1, 0)
    assert classify(logits, [[0, 1], [0, 1]], [[0, 2], [0, 2]], scoring="softmax", gap_tolerance=GAP,
                    valid=np.array([False, True]))[0].tolist() == [IGNORED, FAILURE]


def test_mixed_batch_counts_and_merge():
    logits = _logits(SCORES)
    _, ref = topk_routing_reference(logits, 2)
    artifact = ref.copy()
    artifact[0] = [0, 2]  # exact tie broken the other way: near-tie
    artifact[2] = [0, 3]  # clear gap: failure
    first = router_agreement(1, logits, ref, artifact, scoring="softmax", gap_tolerance=GAP)
    assert (first.tokens, first.matches, first.near_ties, first.failures) == (5, 3, 1, 1)
    second = router_agreement(1, logits, ref, ref, scoring="softmax", gap_tolerance=GAP, input_index=1)
    first.merge(second)
    assert (first.tokens, first.matches, first.near_ties, first.failures) == (10, 8, 1, 1)
    assert first.agreement == 0.8 and not first.passed
    assert first.to_dict()["events"][1] == {"layer": 1, "input": 0, "step": None, "token": 2, "reference": [0, 1],
                                            "artifact": [0, 3], "gap": pytest.approx(0.11, rel=1e-4), "near_tie": False}


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="different shapes"):
        classify(_logits(SCORES[:1]), [[0, 1]], [[0, 1, 2]], scoring="softmax", gap_tolerance=GAP)


# --- version-2 routing: the gap is measured on the selection scores ---------------------------------
def test_near_tie_is_measured_on_the_biased_selection_scores():
    logits = _logits([[0.5, 0.3, 0.19, 0.01]])  # scores: a clear 0.11 gap between experts 1 and 2
    bias = np.array([0.0, 0.0, 0.11 - 4e-6, 0.0], np.float32)  # the bias brings expert 2 within 4e-6 of expert 1
    _, ref = topk_routing_reference(logits, 2, selection_bias=bias)
    assert ref.tolist() == [[0, 1]]
    assert classify(logits, ref, [[0, 2]], scoring="softmax", gap_tolerance=GAP)[0].tolist() == [FAILURE]
    status, gaps = classify(logits, ref, [[0, 2]], scoring="softmax", gap_tolerance=GAP, selection_bias=bias)
    assert status.tolist() == [NEAR_TIE] and gaps[0] < GAP
    # and a bias that opens a gap the scores alone do not have makes a swap a failure
    tied = _logits([[0.4, 0.3, 0.3, 0.0001]])
    wide = np.array([0.0, 0.1, 0.0, 0.0], np.float32)
    assert classify(tied, [[0, 1]], [[0, 2]], scoring="softmax", gap_tolerance=GAP)[0].tolist() == [NEAR_TIE]
    assert classify(tied, [[0, 1]], [[0, 2]], scoring="softmax", gap_tolerance=GAP,
                    selection_bias=wide)[0].tolist() == [FAILURE]


def test_an_expert_outside_the_kept_groups_is_a_failure_however_close_its_score():
    # groups {0, 1} and {2, 3}; top-2 sums 0.6 and 0.4: only the first group is kept
    logits = np.log(np.array([[0.3, 0.3, 0.3 - 1e-6, 0.1 + 1e-6]])).astype(np.float32)
    options = dict(n_group=2, topk_group=1)
    _, ref = topk_routing_reference(logits, 1, **options)
    assert ref.tolist() == [[0]]
    # within the group, expert 1 ties expert 0: a near-tie; expert 2 ties too but lies in the dropped group
    assert classify(logits, ref, [[1]], scoring="softmax", gap_tolerance=GAP, **options)[0].tolist() == [NEAR_TIE]
    assert classify(logits, ref, [[2]], scoring="softmax", gap_tolerance=GAP)[0].tolist() == [NEAR_TIE]
    assert classify(logits, ref, [[2]], scoring="softmax", gap_tolerance=GAP, **options)[0].tolist() == [FAILURE]


def test_layer_selection_reads_the_config_and_the_reference_bias():
    import torch

    from moetrt.config import MoEConfig
    from moetrt.model import MoETransformer
    from moetrt.parity.router import layer_selection

    plain = MoEConfig.from_name("tiny", num_hidden_layers=1)
    assert layer_selection(plain, 0) == {"scoring": "softmax"}
    cfg = MoEConfig.from_name("tiny", num_hidden_layers=1, scoring="sigmoid", selection_bias=True, n_group=4,
                              topk_group=2, group_scoring="max")
    model = MoETransformer(cfg)
    with torch.no_grad():
        model.get_parameter("layers.0.mlp.selection_bias").copy_(torch.arange(8.0))
    got = layer_selection(cfg, 0, model)
    assert {k: v for k, v in got.items() if k != "selection_bias"} == {
        "scoring": "sigmoid", "n_group": 4, "topk_group": 2, "group_scoring": "max"}
    np.testing.assert_array_equal(got["selection_bias"], np.arange(8.0, dtype=np.float32))
    with pytest.raises(ValueError, match=r"pass the reference model, whose layers.0.mlp.selection_bias holds it"):
        layer_selection(cfg, 0)
