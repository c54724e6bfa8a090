"""The dtype vocabulary (moetrt/dtypes.py) against torch's, NumPy's and ONNX's own constants."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from moetrt import dtypes

# dtype, element name, torch dtype, onnx.TensorProto element type, bytes per element
TABLE = [
    ("fp32", "float32", torch.float32, onnx.TensorProto.FLOAT, 4),
    ("fp16", "float16", torch.float16, onnx.TensorProto.FLOAT16, 2),
    ("bf16", "bfloat16", torch.bfloat16, onnx.TensorProto.BFLOAT16, 2),
]


@pytest.mark.parametrize(("dtype", "element", "torch_dtype", "elem_type", "size"), TABLE)
def test_every_mapping(dtype, element, torch_dtype, elem_type, size):
    for name in (dtype, element, torch_dtype):
        assert dtypes.dtype_name(name) == dtype
        assert dtypes.element_name(name) == element
        assert dtypes.onnx_elem_type(name) == elem_type
        assert dtypes.torch_dtype(name) == torch_dtype
        assert dtypes.itemsize(name) == size == torch_dtype.itemsize
    assert dtypes.from_onnx(elem_type) == dtype
    assert dtypes.numpy_dtype(dtype).name == element and dtypes.numpy_dtype(dtype).itemsize == size


def test_other_types_are_refused_or_none():
    assert dtypes.from_onnx(onnx.TensorProto.INT64) is None
    with pytest.raises(ValueError, match="precision must be one of fp32, fp16, bf16, got 'int8'"):
        dtypes.check_dtype("int8", "precision")
    with pytest.raises(ValueError, match="torch.float32"):
        dtypes.dtype_name(torch.int64)
    with pytest.raises(ValueError, match="fp32, fp16, bf16"):
        dtypes.numpy_dtype("float64")
    assert np.zeros(1, dtypes.numpy_dtype("fp16")).dtype == np.float16
