"""The tolerance table: complete, reasoned, overridable, and a comparison rule that can fail."""

from __future__ import annotations

import numpy as np
import pytest

from moetrt.parity import DTYPES, KINDS, TOLERANCES, Tolerance, check_close, parse_tolerance, resolve_tolerances, tolerance


def test_every_dtype_and_kind_has_a_reasoned_entry():
    assert set(TOLERANCES) == {(d, k) for d in DTYPES for k in KINDS}
    for key, tol in TOLERANCES.items():
        assert tol.reason and len(tol.reason) > 15, f"{key} needs a one-line reason"
        assert tol.atol >= 0 and tol.rtol >= 0


def test_lower_precision_never_has_tighter_tolerances():
    for kind in KINDS:
        fp32, fp16, bf16 = (TOLERANCES[(d, kind)] for d in ("fp32", "fp16", "bf16"))
        assert fp32.atol <= fp16.atol <= bf16.atol, kind
        assert fp32.rtol <= fp16.rtol <= bf16.rtol, kind


@pytest.mark.parametrize("key", ["logits", ("fp16", "logits")])
def test_overrides_by_kind_or_by_dtype_and_kind(key):
    got = tolerance("fp16", "logits", {key: (0.5, 0.25)})
    assert (got.atol, got.rtol, got.reason) == (0.5, 0.25, "user override")
    assert tolerance("fp16", "kv", {key: (0.5, 0.25)}) == TOLERANCES[("fp16", "kv")]
    assert tolerance("fp32", "logits", {("fp16", "logits"): (0.5, 0.25)}) == TOLERANCES[("fp32", "logits")]


def test_resolve_rejects_unknown_overrides():
    with pytest.raises(ValueError, match="unknown tolerance override"):
        resolve_tolerances("fp32", {"logit": (1, 1)})
    with pytest.raises(ValueError, match="unknown tolerance override"):
        resolve_tolerances("fp32", {("fp8", "logits"): (1, 1)})
    with pytest.raises(ValueError, match="no tolerances for dtype"):
        tolerance("int8", "logits")
    with pytest.raises(ValueError, match="non-negative"):
        resolve_tolerances("fp32", {"logits": (-1, 0)})


@pytest.mark.parametrize("text,expected", [("logits=1e-3", ("logits", 1e-3, 0.0)), ("kv=0.1,0.05", ("kv", 0.1, 0.05)),
                                           (" router_gap = 2e-5 ", ("router_gap", 2e-5, 0.0))])
def test_parse_tolerance(text, expected):
    kind, tol = parse_tolerance(text)
    assert (kind, tol.atol, tol.rtol) == expected


@pytest.mark.parametrize("text", ["logits", "logit=1", "logits=a", "logits=1,2,3", "logits="])
def test_parse_tolerance_errors_say_how_to_write_it(text):
    with pytest.raises(ValueError, match="ATOL"):
        parse_tolerance(text)


def test_check_close_fails_outside_both_atol_and_rtol():
    tol = Tolerance(1e-3, 1e-2, "test")
    expected = np.array([1.0, 100.0, 0.0])
    assert check_close(expected + [5e-4, 0.5, 9e-4], expected, tol).ok  # within atol, within rtol, within atol
    bad = check_close(expected + [0, 0, 2e-3], expected, tol)  # 2e-3 from 0: outside atol and rtol
    assert not bad.ok and bad.worst_index == (2,) and bad.max_abs == pytest.approx(2e-3)
    assert not check_close(expected + [0, 2.0, 0], expected, tol).ok  # 2% of 100 > rtol 1%
    assert not check_close([np.nan, 100.0, 0.0], expected, tol).ok  # NaN never passes
    with pytest.raises(ValueError, match="shape mismatch"):
        check_close(np.zeros(2), np.zeros(3), tol)


def test_all_sets_every_compared_value_and_named_kinds_override_it():
    from moetrt.parity.tolerances import ALL_KINDS, parse_tolerances

    tols = parse_tolerances(["logits=1,0.2", "all=0.5,0.1"])
    assert set(tols) == set(ALL_KINDS) and "router_gap" in tols
    assert (tols["logits"].atol, tols["logits"].rtol) == (1.0, 0.2)  # named wins, whatever the order
    assert all((tols[k].atol, tols[k].rtol) == (0.5, 0.1) for k in ALL_KINDS if k != "logits")
    with pytest.raises(ValueError, match="KIND one of all, logits"):
        parse_tolerances(["everything=1"])
