"""The one tolerance table: per export dtype and output kind, each entry with its reason.

Every artifact is compared with the fp32 PyTorch reference. An element passes when it is within
``atol`` of the reference OR within ``rtol`` of it relative to the reference value, i.e. it fails
only when ``|actual - expected| > atol`` and ``|actual - expected| > rtol * |expected|``: Polygraphy's
``elemwise`` rule, used both by :func:`check_close` and by the Comparator in
:func:`moetrt.parity.compare`, so a number in this table means the same thing everywhere.

Kinds:

- ``logits``: the ``logits`` graph output (float32 in every export dtype);
- ``hidden``: activations inside the network (residual stream, norm, attention, expert outputs);
- ``kv``: the ``present.{i}.key|value`` outputs;
- ``state``: fixed-size state outputs, a linear-attention layer's ``present.{i}.conv_state`` and
  ``present.{i}.recurrent_state`` (the recurrent state is float32 in every dtype);
- ``router_logits``: the float32 input of ``TopKRouting``;
- ``router_weights``: the routing weights of the chosen experts;
- ``router_gap``: not an error bound but the score gap (softmax/sigmoid scores, not logits)
  between the reference's k-th and (k+1)-th expert below which a different expert choice counts as
  a near-tie (reported) rather than a bug (failed).

Users override entries per run (``compare(..., tolerances={"logits": (1e-3, 1e-4)})``, or
``moetrt parity ... --tol logits=1e-3,1e-4``); an override carries the reason "user override".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moetrt.dtypes import DTYPES

__all__ = [
    "Tolerance", "TOLERANCES", "KINDS", "DTYPES", "tolerance", "resolve_tolerances", "parse_tolerance",
    "parse_tolerances", "ALL", "ALL_KINDS",
    "check_close", "Closeness",
]

KINDS = ("logits", "hidden", "kv", "router_logits", "router_weights", "router_gap", "state")


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    reason: str

    def to_dict(self) -> dict:
        return {"atol": self.atol, "rtol": self.rtol, "reason": self.reason}


TOLERANCES: dict[tuple[str, str], Tolerance] = {
    # fp32: the same math in a different summation order (MLAS vs ATen GEMMs, fused softmax).
    # Measured on the passing cases (tests/parity): max abs error <= ~3e-6 on logits and activations.
    ("fp32", "logits"): Tolerance(1e-4, 1e-5, "fp32 GEMM/softmax reductions in another order: ~1e-7 relative per op, grown over layers"),
    ("fp32", "hidden"): Tolerance(1e-4, 1e-5, "as logits, before the final norm and head"),
    ("fp32", "kv"): Tolerance(1e-4, 1e-5, "keys/values pass through few ops; reordered fp32 sums only"),
    ("fp32", "router_logits"): Tolerance(1e-4, 1e-5, "one fp32 GEMM on hidden states that agree to ~1e-6"),
    ("fp32", "router_weights"): Tolerance(1e-5, 1e-5, "softmax over E in fp32 on identical router logits up to ~1e-6"),
    ("fp32", "router_gap"): Tolerance(1e-5, 0.0, "scores differ by ~1e-6 across back ends: gaps below 1e-5 may flip"),
    # fp16: 11-bit mantissa activations and weights, fp32 router and logits
    ("fp32", "state"): Tolerance(1e-4, 1e-5, "conv inputs and the delta rule's state: a Scan, chunked matmuls or "
                                "token steps sum the same fp32 terms in another order"),
    ("fp16", "logits"): Tolerance(5e-2, 2e-2, "fp16 weights/activations: ~5e-4 relative per op, compounded over layers and the vocab GEMM"),
    ("fp16", "hidden"): Tolerance(5e-2, 2e-2, "fp16 residual stream, rounded at every add"),
    ("fp16", "kv"): Tolerance(2e-2, 1e-2, "fp16 projections of fp16 activations"),
    ("fp16", "router_logits"): Tolerance(2e-2, 1e-2, "fp32 GEMM over fp16-rounded normed activations and fp16 gate weights"),
    ("fp16", "router_weights"): Tolerance(5e-3, 5e-3, "fp32 router math on fp16 activations"),
    ("fp16", "router_gap"): Tolerance(5e-3, 0.0, "router logits move by ~1e-3 with fp16 activations"),
    ("fp16", "state"): Tolerance(2e-2, 1e-2, "fp16 conv inputs; the float32 recurrent state sums fp16-rounded keys/values"),
    # bf16: 8-bit mantissa
    ("bf16", "logits"): Tolerance(2e-1, 5e-2, "bf16 keeps 8 mantissa bits: ~4e-3 relative per op, compounded"),
    ("bf16", "hidden"): Tolerance(2e-1, 5e-2, "bf16 residual stream"),
    ("bf16", "kv"): Tolerance(1e-1, 5e-2, "bf16 projections"),
    ("bf16", "router_logits"): Tolerance(1e-1, 5e-2, "fp32 GEMM over bf16-rounded activations and bf16 gate weights"),
    ("bf16", "router_weights"): Tolerance(3e-2, 3e-2, "fp32 router math on bf16 activations"),
    ("bf16", "router_gap"): Tolerance(3e-2, 0.0, "router logits move by ~1e-2 with bf16 activations"),
    ("bf16", "state"): Tolerance(1e-1, 5e-2, "bf16 conv inputs; the float32 recurrent state sums bf16-rounded keys/values"),
}

USER_OVERRIDE = "user override"


def tolerance(dtype: str, kind: str, overrides: dict | None = None) -> Tolerance:
    """The entry for (dtype, kind), or the user's override for it.

    ``overrides`` maps ``(dtype, kind)`` or ``kind`` (for any dtype) to a :class:`Tolerance` or an
    ``(atol, rtol)`` pair.
    """
    if dtype not in DTYPES:
        raise ValueError(f"no tolerances for dtype {dtype!r}; dtypes: {list(DTYPES)}")
    if kind not in KINDS:
        raise ValueError(f"no tolerance kind {kind!r}; kinds: {list(KINDS)}")
    for key in ((dtype, kind), kind):
        if overrides and key in overrides:
            return _as_tolerance(overrides[key], key)
    return TOLERANCES[(dtype, kind)]


def resolve_tolerances(dtype: str, overrides: dict | None = None) -> dict[str, Tolerance]:
    """Every kind's tolerance for ``dtype``, with the user's overrides applied (unknown keys raise)."""
    for key in overrides or {}:
        kind = key[1] if isinstance(key, tuple) else key
        if kind not in KINDS or (isinstance(key, tuple) and key[0] not in DTYPES):
            raise ValueError(
                f"unknown tolerance override {key!r}: use a kind ({', '.join(KINDS)}) or a (dtype, kind) pair "
                f"with dtype in {list(DTYPES)}"
            )
    return {kind: tolerance(dtype, kind, overrides) for kind in KINDS}


def _as_tolerance(value, key) -> Tolerance:
    if isinstance(value, Tolerance):
        return value
    try:
        atol, rtol = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"tolerance override for {key!r} must be a Tolerance or an (atol, rtol) pair, got {value!r}"
        ) from None
    if atol < 0 or rtol < 0:
        raise ValueError(f"tolerance override for {key!r} must be non-negative, got atol={atol}, rtol={rtol}")
    return Tolerance(atol, rtol, USER_OVERRIDE)


# ``--tol all=ATOL,RTOL``: every kind at once (logits, hidden states, KV, router outputs, and the
# router score gap under which a changed expert choice counts as a near-tie): the one bound a
# quantized artifact, which moves hidden states and so some routing decisions, is accepted under
ALL = "all"
ALL_KINDS = KINDS


def parse_tolerances(texts) -> dict[str, Tolerance]:
    """``["all=0.5,0.1", "logits=1,0.2"]`` -> {kind: Tolerance}: ``all`` first, named kinds over it."""
    overrides: dict[str, Tolerance] = {}
    named = []
    for text in texts:
        kind, sep, values = text.partition("=")
        if kind.strip() == ALL and sep:
            _, tol = parse_tolerance(f"logits={values}")
            overrides.update({k: _as_tolerance((tol.atol, tol.rtol), k) for k in ALL_KINDS})
        else:
            named.append(parse_tolerance(text))
    overrides.update(named)
    return overrides


def parse_tolerance(text: str) -> tuple[str, Tolerance]:
    """``"logits=1e-3"`` or ``"logits=1e-3,1e-4"`` (atol[,rtol]; rtol defaults to 0) -> (kind, Tolerance)."""
    kind, sep, values = text.partition("=")
    kind = kind.strip()
    if not sep or kind not in KINDS:
        raise ValueError(f"a tolerance override reads KIND=ATOL[,RTOL] with KIND one of {ALL}, {', '.join(KINDS)}; "
                         f"got {text!r}")
    parts = [p for p in values.split(",") if p.strip()]
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"tolerance override {text!r}: ATOL and RTOL must be numbers, e.g. logits=1e-3,1e-4") from None
    if len(numbers) not in (1, 2):
        raise ValueError(f"tolerance override {text!r}: give ATOL or ATOL,RTOL, e.g. logits=1e-3,1e-4")
    return kind, _as_tolerance((numbers[0], numbers[1] if len(numbers) == 2 else 0.0), kind)


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
    """Compare two arrays (any float dtype, upcast to float64) under ``tol``; NaN never passes.

    An element fails when it is outside ``atol`` AND outside ``rtol * |expected|`` (the rule of the
    module docstring, Polygraphy's ``elemwise`` check).
    """
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise ValueError(f"shape mismatch: actual {a.shape} vs expected {e.shape}")
    if a.size == 0:
        return Closeness(True, 0.0, 0.0, (), tol)
    diff = np.abs(a - e)
    within = (diff <= tol.atol) | (diff <= tol.rtol * np.abs(e))  # NaN compares False, so it is bad
    worst = np.unravel_index(int(np.nanargmax(np.where(np.isnan(diff), np.inf, diff))), diff.shape)
    max_abs = float(np.nanmax(np.where(np.isnan(diff), np.inf, diff)))
    scale = float(np.max(np.abs(e))) or 1.0
    return Closeness(bool(within.all()), max_abs, max_abs / scale, tuple(int(i) for i in worst), tol)
