"""torch -> canonical ONNX (moetrt::TopKRouting + moetrt::SparseMoE), I/O spec, metadata."""

from .io_spec import DTYPES, IOSpec, TensorSpec, io_spec
from .onnx_from_torch import FORMAT, FORMAT_VERSION, onnx_from_torch

__all__ = ["onnx_from_torch", "io_spec", "IOSpec", "TensorSpec", "DTYPES", "FORMAT", "FORMAT_VERSION"]
