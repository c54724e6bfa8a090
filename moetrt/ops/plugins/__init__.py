"""TensorRT plugins of the two MoE ops, as ``tensorrt.plugin`` (quickly deployable Python plugins).

    from moetrt.ops.plugins import register_plugins
    register_plugins()          # before parsing an ONNX model with moetrt nodes or loading a JIT-plugin engine

Nothing here imports tensorrt, triton or polygraphy until :func:`register_plugins` is called;
the definitions themselves live in ``moetrt.ops.plugins._trt`` (imports tensorrt), the AOT
kernels in :mod:`moetrt.ops.plugins.aot` (plain Python) and ``aot_kernels`` (imports triton).

Plugins (namespace ``moetrt``, version 1), with their attributes in registration order (the
ONNX nodes carry them; TensorRT's parser hands a ``tensorrt.plugin`` creator exactly the node
attributes it declares, converting INT attributes to int32):

========================  =====================================================  =========
plugin                    attributes                                             impl
========================  =====================================================  =========
``TopKRouting``           k, scoring, normalize, scale                           AOT + JIT
``SparseMoE``             activation, alpha, limit, has_b_gate_up, has_b_down    JIT
``MoEAlign``              num_experts, k, block_m                                AOT
``MoEGateUp``             num_experts, hidden_size, ffn, k, block_m, block_n,    AOT
                          block_k, num_warps, num_stages, group_m, activation,
                          alpha, limit, has_b_gate_up
``MoEDown``               (MoEGateUp's integers), has_b_down                     AOT
``MoECombine``            num_experts, hidden_size, k, block_d                   AOT
========================  =====================================================  =========

``activation``, ``alpha`` and ``limit`` are ``moetrt::SparseMoE``'s own attributes, named as
its spec (``moetrt.ops.sparse_moe.SPEC``) declares them. A TensorRT plugin has a fixed list of
inputs, so the plugins always take the op's optional bias inputs (``b_gate_up`` into
``SparseMoE`` and ``MoEGateUp``, ``b_down`` into ``SparseMoE`` and ``MoEDown``), and an INT
attribute ``has_<input>`` per optional input says whether the node had it (the graph rewrite,
``moetrt.optimize.trt``, feeds a one-element zero where it did not; the kernels never read it).

An AOT plugin launches one kernel, so an engine built with ``plugins="aot"`` runs each
``SparseMoE`` as the four single-kernel plugins ``MoEAlign -> MoEGateUp -> MoEDown ->
MoECombine`` (the graph rewrite is ``moetrt.optimize.trt``); its PTX is baked into the engine,
which then runs without Python (``trtexec`` included). With ``plugins="jit"`` the engine keeps
``TopKRouting`` / ``SparseMoE`` nodes whose Python implementations launch the same Triton
kernels through torch; such an engine needs :func:`register_plugins` (and torch and triton) in
the process that loads it.
"""

from __future__ import annotations

import re
from typing import Any

from moetrt.errors import BackendMissingError, MoetrtError

__all__ = [
    "PLUGIN_NAMESPACE",
    "PLUGIN_ATTRIBUTES",
    "SPARSE_MOE_ATTRIBUTES",
    "BIAS_FLAGS",
    "AOT_PLUGINS",
    "JIT_PLUGINS",
    "PLUGIN_MODES",
    "MIN_TENSORRT",
    "ENGINE_FORMAT",
    "ENGINE_FORMAT_VERSION",
    "ENGINE_FILE",
    "import_tensorrt",
    "import_tensorrt_rtx",
    "RTX_TARGET",
    "tensorrt_version",
    "version_tuple",
    "register_plugins",
    "plugins_registered",
    "device_info",
]

PLUGIN_NAMESPACE = "moetrt"


# SparseMoE attributes the plugins do not take: prepare_for_tensorrt refuses a node that sets one
SPARSE_MOE_NOT_IN_PLUGINS = ("weight_input",)


def _sparse_moe_spec_names() -> tuple[tuple[str, ...], dict[str, str]]:
    """SparseMoE's attributes the kernels take (all but plugin_namespace and :data:`SPARSE_MOE_NOT_IN_PLUGINS`)
    and ``{optional input: has_<input>}``."""
    from moetrt.ops.sparse_moe import SPEC

    attributes = tuple(a.name for a in SPEC.attrs if a.name not in ("plugin_namespace", *SPARSE_MOE_NOT_IN_PLUGINS))
    return attributes, {p.name: f"has_{p.name}" for p in SPEC.inputs if p.optional}


# SPARSE_MOE_ATTRIBUTES: ("activation", "alpha", "limit"); BIAS_FLAGS: {"b_gate_up": "has_b_gate_up", ...}
SPARSE_MOE_ATTRIBUTES, BIAS_FLAGS = _sparse_moe_spec_names()


def _topk_routing_spec_names() -> tuple[str, ...]:
    """TopKRouting's version-1 attributes (all but plugin_namespace): what its kernel takes. Version-2 nodes
    (a selection bias, groups) are refused by ``prepare_for_tensorrt`` with the reason."""
    from moetrt.ops.topk_routing import SPEC

    return tuple(a.name for a in SPEC.attrs if a.since == 1 and a.name != "plugin_namespace")


_GEMM_ATTRIBUTES = ("num_experts", "hidden_size", "ffn", "k", "block_m", "block_n", "block_k", "num_warps",
                    "num_stages", "group_m")
PLUGIN_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "TopKRouting": _topk_routing_spec_names(),  # ("k", "scoring", "normalize", "scale")
    "SparseMoE": (*SPARSE_MOE_ATTRIBUTES, *BIAS_FLAGS.values()),
    "MoEAlign": ("num_experts", "k", "block_m"),
    "MoEGateUp": (*_GEMM_ATTRIBUTES, *SPARSE_MOE_ATTRIBUTES, BIAS_FLAGS["b_gate_up"]),
    "MoEDown": (*_GEMM_ATTRIBUTES, BIAS_FLAGS["b_down"]),
    "MoECombine": ("num_experts", "hidden_size", "k", "block_d"),
}
AOT_PLUGINS = ("TopKRouting", "MoEAlign", "MoEGateUp", "MoEDown", "MoECombine")
JIT_PLUGINS = ("TopKRouting", "SparseMoE")
PLUGIN_MODES = ("aot", "jit", "none")  # none: the moetrt nodes' function bodies, no plugin (any trtexec user's)
# tensorrt.plugin with aot_impl (trt.QuickPluginCreationRequest) and the ONNX parser's per-node "aot" attribute
MIN_TENSORRT = (10, 9)

# the engine folder written by moetrt.optimize.trt.engine_from_onnx and read by the trt back end
ENGINE_FORMAT, ENGINE_FORMAT_VERSION = "moetrt-trt", 1
ENGINE_FILE = "model.engine"

_INSTALL_HINT = (
    "pip install tensorrt (10.9 or newer: NVIDIA's wheels, for a machine with an NVIDIA GPU and a recent driver; "
    "see https://docs.nvidia.com/deeplearning/tensorrt/latest/installing-tensorrt/installing.html)"
)
_registered = False


def version_tuple(version: str) -> tuple[int, ...]:
    """``"10.13.0.35"`` -> ``(10, 13, 0, 35)``; non-numeric parts end the tuple."""
    out = []
    for part in str(version).split("."):
        match = re.match(r"\d+", part)
        if not match:
            break
        out.append(int(match.group()))
    return tuple(out)


def import_tensorrt(what: str = "this") -> Any:
    """``import tensorrt`` (at least :data:`MIN_TENSORRT`), or a :class:`BackendMissingError` saying what to install."""
    try:
        import tensorrt
    except (ImportError, OSError) as exc:  # also a wheel whose NVIDIA libraries do not load
        raise BackendMissingError(f"{what} needs TensorRT, which is not installed (or fails to import: {exc}): "
                                  f"{_INSTALL_HINT}") from exc
    version = getattr(tensorrt, "__version__", "0")
    if version_tuple(version)[:2] < MIN_TENSORRT:
        need = ".".join(map(str, MIN_TENSORRT))
        raise BackendMissingError(
            f"{what} needs TensorRT >= {need} (Python plugins with ahead-of-time kernels); this machine has "
            f"{version}: pip install -U 'tensorrt>={need}'"
        )
    return tensorrt


# TensorRT for RTX: its own wheel and module (tensorrt_rtx), the same ONNX parser; it builds without a GPU
# (ahead of time, for the compute capabilities asked) and compiles for the GPU when the engine first runs
RTX_TARGET = "trt-rtx"
RTX_PACKAGE = "tensorrt-rtx-cu12==1.7.1.116"


def import_tensorrt_rtx(what: str = "this") -> Any:
    """``import tensorrt_rtx`` (TensorRT for RTX), or a :class:`BackendMissingError` saying what to install."""
    try:
        import tensorrt_rtx
    except (ImportError, OSError) as exc:
        raise BackendMissingError(f"{what} needs TensorRT for RTX, which is not installed (or fails to import: {exc}): "
                                  f"pip install {RTX_PACKAGE} (Linux x86_64)") from exc
    return tensorrt_rtx


def tensorrt_version() -> str | None:
    """The installed TensorRT version, or None when it does not import."""
    try:
        import tensorrt
    except (ImportError, OSError):
        return None
    return str(getattr(tensorrt, "__version__", None))


def register_plugins() -> list[str]:
    """Register the moetrt plugins with TensorRT's plugin registry (once per process).

    Returns the plugin ids (``"moetrt::TopKRouting"``, ...). Raises :class:`BackendMissingError`
    when TensorRT (>= 10.9) does not import. Needs torch; the kernels need triton only when an
    engine is built (AOT) or a JIT plugin runs.
    """
    global _registered
    import_tensorrt("registering the moetrt TensorRT plugins")
    if not _registered:
        from moetrt.ops.plugins import _trt  # noqa: F401  the decorators register on import

        _registered = True
    return [f"{PLUGIN_NAMESPACE}::{name}" for name in PLUGIN_ATTRIBUTES]


def plugins_registered() -> bool:
    """Whether :func:`register_plugins` ran in this process."""
    return _registered


def device_info(index: int | None = None) -> dict[str, Any]:
    """Name and compute capability of CUDA device ``index`` (default: torch's current device).

    The TensorRT stage keeps its buffers in torch CUDA tensors, so it reads the device from torch.
    """
    import torch

    if not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "without CUDA"
        raise MoetrtError(
            f"TensorRT needs an NVIDIA GPU, and torch {torch.__version__} (built {built}) sees none; install a CUDA "
            "build of torch on a machine with an NVIDIA GPU"
        )
    index = torch.cuda.current_device() if index is None else index
    if not 0 <= index < torch.cuda.device_count():
        raise MoetrtError(f"CUDA device {index} does not exist: torch sees {torch.cuda.device_count()} device(s)")
    major, minor = torch.cuda.get_device_capability(index)
    return {"index": index, "name": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}",
            "capability": (major, minor)}
