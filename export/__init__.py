"""torch -> canonical ONNX (moetrt::TopKRouting + moetrt::SparseMoE), I/O spec, metadata."""

from .io_spec import DTYPES, IOSpec, TensorSpec, io_spec
from .moe_layer import onnx_moe_layer
from .onnx_from_torch import FORMAT, FORMAT_VERSION, attach_functions, onnx_from_torch, trace_to_onnx

__all__ = ["onnx_from_torch", "onnx_moe_layer", "trace_to_onnx", "attach_functions", "io_spec", "IOSpec", "TensorSpec", "DTYPES", "FORMAT", "FORMAT_VERSION"]
