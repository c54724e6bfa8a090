"""Parity: comparisons against the fp32 PyTorch reference, tolerance table, reports."""

from .tolerances import KINDS, TOLERANCES, Closeness, Tolerance, check_close, tolerance

__all__ = ["TOLERANCES", "KINDS", "Tolerance", "Closeness", "tolerance", "check_close"]
