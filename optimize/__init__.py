"""Graph passes and per-target lowering (ONNX Runtime; TensorRT comes with its own stage).

``optimize(src_dir, out_dir, target="ort-cpu", precision=..., quantize_experts=...)`` turns a
canonical export into a folder for one target; each pass is a function of an ``onnx_ir.Model``
returning a :class:`PassResult`, usable on its own.

(The last-position logits pass is ``moetrt.optimize.last_logits.last_logits``: a package
attribute of that name would be shadowed by its module once imported.) The names below load on
first use, so ``moetrt.optimize.cli`` (imported by every ``moetrt``
command to build its parser) does not import onnx-ir and onnxscript.
"""

from __future__ import annotations

import importlib

from .targets import PRECISIONS, QUANTIZE_EXPERTS, QUANTIZE_WEIGHTS, TARGETS

__all__ = [
    "optimize",
    "check_requirements",
    "TARGETS",
    "PRECISIONS",
    "QUANTIZE_EXPERTS",
    "QUANTIZE_WEIGHTS",
    "PassResult",
    "lower_moe",
    "quantize_experts",
    "quantize_weights",
    "convert_precision",
    "fuse_norms",
    "group_attention",
]

_LAZY = {
    "optimize": ".lower",
    "check_requirements": ".lower",
    "PassResult": "._common",
    "lower_moe": ".moe_lowering",
    "quantize_experts": ".expert_quantization",
    "convert_precision": ".precision",
    "quantize_weights": ".weight_quantization",
    "fuse_norms": ".transformer_fusions",
    "group_attention": ".grouped_attention",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
