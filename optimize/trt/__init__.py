"""TensorRT: engines from the canonical export, with the moetrt plugins for the MoE ops.

    from moetrt.optimize.trt import engine_from_onnx
    engine_from_onnx("exported/tiny", "engines/tiny", precision="fp16", profile="batch=1:2:4,seq=1:64:256,past=0:64:256")
    # then: moetrt.runtime.Session("engines/tiny", backend="trt")
    engine_from_onnx("exported/tiny", "engines/tiny-rtx", target="trt-rtx", compute_capabilities=["8.6", "12.0"])
    # TensorRT for RTX: built with no GPU, from the ops' function bodies

Submodules: :mod:`.profiles` (``--profile`` strings -> per-input shapes), :mod:`.prepare` (the
pass that makes the ONNX ready for TensorRT's parser), :mod:`.build` (``engine_from_onnx``).
Importing this package imports neither onnx-ir nor tensorrt (tensorrt_rtx), polygraphy or triton; those load
when a model is prepared or an engine is built.
"""

from __future__ import annotations

import importlib

from .build import PRECISIONS, engine_from_onnx, precision_flags
from .profiles import DEFAULT_PROFILE, AxisRange, ProfileSpec, parse_profile, parse_profiles

__all__ = [
    "engine_from_onnx",
    "PRECISIONS",
    "precision_flags",
    "prepare_for_tensorrt",
    "tensorrt_problems",
    "parse_profile",
    "parse_profiles",
    "ProfileSpec",
    "AxisRange",
    "DEFAULT_PROFILE",
]

_LAZY = {"prepare_for_tensorrt": ".prepare", "tensorrt_problems": ".prepare"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
