"""The one dtype vocabulary: the names an artifact's dtype takes and what each maps to.

An export, an optimized folder and an engine carry one of ``fp32`` / ``fp16`` / ``bf16``
(``moetrt.json``'s ``export.dtype``; router math and logits stay float32 in every one). Graph
tensors are described by their element name (``float32``, ``float16``, ``bfloat16``: the NumPy
spelling, as ``io`` in ``moetrt.json`` writes them). This module maps between the two and onto
torch, NumPy (bfloat16 through ``ml_dtypes``) and ONNX ``TensorProto`` element types; nothing
else restates these tables. It imports nothing heavy: torch and NumPy load on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "DTYPES", "ELEMENT_NAMES", "ONNX_ELEM_TYPES", "ITEMSIZE",
    "check_dtype", "dtype_name", "element_name", "onnx_elem_type", "itemsize",
    "torch_dtype", "numpy_dtype", "from_torch", "from_onnx",
]

# the dtypes an artifact can take
DTYPES = ("fp32", "fp16", "bf16")
# dtype -> the element name of its tensors in ``io`` (NumPy's spelling; NumPy itself has no bfloat16)
ELEMENT_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# dtype -> onnx.TensorProto element type (FLOAT, FLOAT16, BFLOAT16); onnx_ir's DataType uses the same numbers
ONNX_ELEM_TYPES = {"fp32": 1, "fp16": 10, "bf16": 16}
# dtype -> bytes per element
ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}

_BY_ELEMENT = {element: dtype for dtype, element in ELEMENT_NAMES.items()}


def check_dtype(dtype: Any, field: str = "dtype") -> str:
    """``dtype`` if it is one of :data:`DTYPES`; a ``ValueError`` naming ``field`` and the choices otherwise."""
    if dtype not in DTYPES:
        raise ValueError(f"{field} must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def dtype_name(dtype: Any, field: str = "dtype") -> str:
    """The short name (``"fp16"``) of a short name, an element name (``"float16"``), or a torch dtype."""
    if isinstance(dtype, str):
        if dtype in DTYPES:
            return dtype
        if dtype in _BY_ELEMENT:
            return _BY_ELEMENT[dtype]
        raise ValueError(
            f"{field} must be one of {', '.join(DTYPES)} (or {', '.join(ELEMENT_NAMES.values())}), got {dtype!r}"
        )
    return from_torch(dtype, field)


def element_name(dtype: Any) -> str:
    """``"float32"`` / ``"float16"`` / ``"bfloat16"`` for any name :func:`dtype_name` accepts."""
    return ELEMENT_NAMES[dtype_name(dtype)]


def onnx_elem_type(dtype: Any) -> int:
    """The ``onnx.TensorProto`` element type for any name :func:`dtype_name` accepts."""
    return ONNX_ELEM_TYPES[dtype_name(dtype)]


def itemsize(dtype: Any) -> int:
    return ITEMSIZE[dtype_name(dtype)]


def from_onnx(elem_type: int) -> str | None:
    """The dtype of an ``onnx.TensorProto`` element type; ``None`` for a type that is none of them (int64, ...)."""
    return next((d for d, t in ONNX_ELEM_TYPES.items() if t == int(elem_type)), None)


def torch_dtype(dtype: Any):
    """The ``torch.dtype`` for any name :func:`dtype_name` accepts."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name(dtype)]


def from_torch(dtype: Any, field: str = "dtype") -> str:
    """The dtype name of a ``torch.dtype`` (float32, float16 or bfloat16)."""
    name = str(dtype).removeprefix("torch.")
    if name not in _BY_ELEMENT:
        raise ValueError(f"{field} must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
    return _BY_ELEMENT[name]


def numpy_dtype(dtype: Any):
    """The NumPy dtype for any name :func:`dtype_name` accepts; bfloat16 is ``ml_dtypes.bfloat16``."""
    import numpy as np

    name = dtype_name(dtype)
    if name == "bf16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(ELEMENT_NAMES[name])
