"""The one tolerance table: per export dtype and output kind, each entry with its reason.

Every artifact is compared with the fp32 PyTorch reference. An element passes when
``|actual - expected| <= atol + rtol * |expected|`` (numpy.isclose's rule). Router decisions are
compared as expert sets; ``router_gap`` is the score gap between the k-th and (k+1)-th expert
below which a different choice counts as a near-tie rather than a bug.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Tolerance", "TOLERANCES", "KINDS", "tolerance", "check_close", "Closeness"]

KINDS = ("logits", "hidden", "kv", "router_weights", "router_gap")


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    reason: str


TOLERANCES: dict[tuple[str, str], Tolerance] = {
    # fp32: the same math in a different summation order (MLAS vs ATen GEMMs, fused softmax)
    ("fp32", "logits"): Tolerance(1e-4, 1e-5, "fp32 GEMM/softmax reductions in another order: ~1e-7 relative per op, grown over layers"),
    ("fp32", "hidden"): Tolerance(1e-4, 1e-5, "as logits, before the final norm and head"),
    ("fp32", "kv"): Tolerance(1e-4, 1e-5, "keys/values pass through few ops; reordered fp32 sums only"),
    ("fp32", "router_weights"): Tolerance(1e-5, 1e-5, "softmax over E in fp32 on identical router logits up to ~1e-6"),
    ("fp32", "router_gap"): Tolerance(1e-5, 0.0, "scores differ by ~1e-6 across back ends: gaps below 1e-5 may flip"),
    # fp16: 11-bit mantissa activations and weights, fp32 router and logits
    ("fp16", "logits"): Tolerance(5e-2, 2e-2, "fp16 weights/activations: ~5e-4 relative per op, compounded over layers and the vocab GEMM"),
    ("fp16", "hidden"): Tolerance(5e-2, 2e-2, "fp16 residual stream, rounded at every add"),
    ("fp16", "kv"): Tolerance(2e-2, 1e-2, "fp16 projections of fp16 activations"),
    ("fp16", "router_weights"): Tolerance(5e-3, 5e-3, "fp32 router math on fp16 activations"),
    ("fp16", "router_gap"): Tolerance(5e-3, 0.0, "router logits move by ~1e-3 with fp16 activations"),
    # bf16: 8-bit mantissa
    ("bf16", "logits"): Tolerance(2e-1, 5e-2, "bf16 keeps 8 mantissa bits: ~4e-3 relative per op, compounded"),
    ("bf16", "hidden"): Tolerance(2e-1, 5e-2, "bf16 residual stream"),
    ("bf16", "kv"): Tolerance(1e-1, 5e-2, "bf16 projections"),
    ("bf16", "router_weights"): Tolerance(3e-2, 3e-2, "fp32 router math on bf16 activations"),
    ("bf16", "router_gap"): Tolerance(3e-2, 0.0, "router logits move by ~1e-2 with bf16 activations"),
}


def tolerance(dtype: str, kind: str, overrides: dict[tuple[str, str], Tolerance] | None = None) -> Tolerance:
    """The entry for (dtype, kind), or the user's override for it."""
    key = (dtype, kind)
    if overrides and key in overrides:
        return overrides[key]
    if key not in TOLERANCES:
        dtypes = sorted({d for d, _ in TOLERANCES})
        raise ValueError(f"no tolerance for dtype {dtype!r} and kind {kind!r}; dtypes: {dtypes}, kinds: {list(KINDS)}")
    return TOLERANCES[key]


@dataclass(frozen=True)
class Closeness:
    ok: bool
    max_abs: float
    max_rel: float  # max |a - e| / max |e|
    worst_index: tuple[int, ...]
    tolerance: Tolerance

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return (f"{verdict}: max abs {self.max_abs:.3e} (atol {self.tolerance.atol:g}, rtol {self.tolerance.rtol:g}), "
                f"max rel {self.max_rel:.3e}")


def check_close(actual, expected, tol: Tolerance) -> Closeness:
    """Compare two arrays (any float dtype, upcast to float64) under ``tol``; NaN never passes."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise ValueError(f"shape mismatch: actual {a.shape} vs expected {e.shape}")
    if a.size == 0:
        return Closeness(True, 0.0, 0.0, (), tol)
    diff = np.abs(a - e)
    bad = ~(diff <= tol.atol + tol.rtol * np.abs(e))  # NaN compares False, so it is bad
    worst = np.unravel_index(int(np.nanargmax(np.where(np.isnan(diff), np.inf, diff))), diff.shape)
    max_abs = float(np.nanmax(np.where(np.isnan(diff), np.inf, diff)))
    scale = float(np.max(np.abs(e))) or 1.0
    return Closeness(not bool(bad.any()), max_abs, max_abs / scale, tuple(int(i) for i in worst), tol)

