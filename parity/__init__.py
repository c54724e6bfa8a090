"""Parity: comparisons against the fp32 PyTorch reference, tolerance table, reports."""
