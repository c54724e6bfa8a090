"""Parity: comparisons against the fp32 PyTorch reference, tolerance table, router analysis, reports.

``compare(reference, artifact, backends=["ort"])`` runs the whole check and returns a
:class:`ParityReport`. Polygraphy (the ``parity`` extra) is imported only when a comparison runs,
so the tolerance table needs nothing beyond numpy.
"""

from .checkpoints import POINTS, Checkpoint, checkpoints_for, mark_checkpoints
from .compare import BACKENDS, compare, default_inputs
from .generation import GenerationResult, explain_divergence
from .report import SCHEMA, SCHEMA_VERSION, BackendResult, CheckpointResult, ParityReport
from .router import RouterLayerResult, RoutingEvent, boundary_gap, classify, router_agreement, router_scores, selection_scores
from .tolerances import (DTYPES, KINDS, TOLERANCES, Closeness, Tolerance, check_close, parse_tolerance,
                         resolve_tolerances, tolerance)

__all__ = [
    # tolerance table
    "TOLERANCES", "KINDS", "DTYPES", "Tolerance", "Closeness", "tolerance", "resolve_tolerances", "parse_tolerance",
    "check_close",
    # comparison
    "compare", "default_inputs", "BACKENDS", "ParityReport", "BackendResult", "CheckpointResult", "SCHEMA",
    "SCHEMA_VERSION",
    # localisation
    "Checkpoint", "POINTS", "checkpoints_for", "mark_checkpoints",
    # routing and generation
    "RouterLayerResult", "RoutingEvent", "router_agreement", "classify", "router_scores", "selection_scores", "boundary_gap",
    "GenerationResult", "explain_divergence",
    # the PyTorch reference as a Polygraphy runner (imports polygraphy)
    "TorchRunner",
]


def __getattr__(name):
    if name == "TorchRunner":
        from .runners import TorchRunner

        return TorchRunner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
