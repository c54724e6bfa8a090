"""Ahead-of-time kernels of the TensorRT plugins: what each plugin launches, compiled to PTX.

A ``tensorrt.plugin`` AOT plugin returns ONE kernel (``get_kernel`` / ``get_launch_params`` of
``_TemplateAOTPlugin`` in ``python/packaging/bindings_wheel/tensorrt/plugin/_plugin_class.py``
keep a single ``(kernel_name, ptx)`` and one set of launch parameters per plugin), while
``moetrt::SparseMoE`` runs four kernels (align, gate|up, down, combine). So in an engine built
with ``plugins="aot"`` each ``SparseMoE`` node becomes four single-kernel plugins,
``moetrt::MoEAlign -> MoEGateUp -> MoEDown -> MoECombine``, whose scratch buffers (the
alignment, ``h`` and the per-slot outputs) are ordinary TensorRT tensors between them;
``TopKRouting`` is one plugin with one kernel. The graph rewrite that does this lives in
``moetrt.optimize.trt``; this module says what each kernel is and how it is launched, with no
TensorRT and (until something is compiled) no triton import, so it is checked on any machine.

Shape legend: T tokens, E experts, K routed per token, P = T*K pairs, D model dim, F expert
dim, BM the alignment block (M tile).

Triton appends two hidden pointer parameters to every kernel (``global_scratch`` and
``profile_scratch``, see ``moetrt.ops.kernels.compile``). TensorRT passes exactly the plugin's
inputs, extra scalars and outputs; these kernels use no scratch, so :func:`compile_aot_kernel`
removes the two unused parameters from the PTX entry, making the kernel's ABI exactly what
TensorRT launches (and fails if a future Triton starts to use them).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from types import SimpleNamespace
from collections.abc import Iterable, Mapping
from typing import Any

from moetrt.ops.kernels.compile import KernelSpec
from moetrt.ops.kernels.configs import SparseMoEConfig, next_power_of_2, sparse_moe_config, topk_routing_blocks
from moetrt.ops.plugins import BIAS_FLAGS, PLUGIN_ATTRIBUTES, SPARSE_MOE_ATTRIBUTES
from moetrt.ops.sparse_moe import SPEC as SPARSE_MOE_SPEC

__all__ = [
    "AotKernel",
    "CompiledKernel",
    "INT_OPS",
    "SPARSE_MOE_PLUGINS",
    "aot_kernel",
    "attribute_text",
    "topk_routing_aot_kernel",
    "moe_align_aot_kernel",
    "moe_gate_up_aot_kernel",
    "moe_down_aot_kernel",
    "moe_combine_aot_kernel",
    "sparse_moe_plan",
    "sparse_moe_attributes",
    "max_blocks",
    "launch_grid",
    "compile_aot_kernel",
    "MAX_AOT_SHARED",
    "strip_unused_params",
]

# the four plugins one SparseMoE node becomes in an AOT engine, in launch order
SPARSE_MOE_PLUGINS = ("MoEAlign", "MoEGateUp", "MoEDown", "MoECombine")
_TRITON_DTYPES = {"fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16", "bf16": "bf16", "bfloat16": "bf16"}

# integer arithmetic for the launch formulas; the TensorRT plugins pass trtp.cdiv/min/max instead,
# so the same formula serves ints here and symbolic shape expressions in an engine
INT_OPS = SimpleNamespace(cdiv=lambda a, b: -(-a // b), min=min, max=max)


@dataclass(frozen=True)
class _PluginKernelSpec(KernelSpec):
    """A :class:`KernelSpec` whose kernel is one of the wrappers in ``moetrt.ops.plugins.aot_kernels``."""

    def jit_function(self):
        from moetrt.ops.plugins import aot_kernels

        return getattr(aot_kernels, self.kernel)


@dataclass(frozen=True)
class AotKernel:
    """The one kernel an AOT plugin launches: its spec and which parameters TensorRT fills.

    The kernel's run-time parameters are, in order, ``inputs`` (the plugin's input pointers),
    ``extras`` (int32 scalars, TensorRT's ``extra_args``) and ``outputs`` (output pointers).
    """

    plugin: str  # "TopKRouting" | "MoEAlign" | "MoEGateUp" | "MoEDown" | "MoECombine"
    spec: KernelSpec
    inputs: tuple[str, ...]
    extras: tuple[str, ...]
    outputs: tuple[str, ...]
    num_experts: int
    k: int  # routed experts per token (TopKRouting's k)

    def __post_init__(self):
        order = (*self.inputs, *self.extras, *self.outputs)
        assert tuple(self.spec.signature) == order, (self.plugin, tuple(self.spec.signature), order)

    @property
    def num_params(self) -> int:
        return len(self.inputs) + len(self.extras) + len(self.outputs)

    def key(self) -> str:
        spec = self.spec
        return json.dumps([self.plugin, spec.kernel, spec.signature, spec.constants, spec.num_warps, spec.num_stages],
                          sort_keys=True, default=str)


def attribute_text(value: str | bytes) -> str:
    """A STRING attribute as a plugin receives it, without the C terminator.

    TensorRT's ONNX parser copies a STRING attribute into its plugin field with a trailing
    ``\\0`` (``copyField(std::string ...)`` in onnx-tensorrt's ``onnxOpImporters.cpp``), and
    ``tensorrt.plugin`` decodes the field's bytes as they are.
    """
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    return value.rstrip("\x00")


def _triton_dtype(dtype: str) -> str:
    key = str(dtype).replace("torch.", "").lower()
    if key not in _TRITON_DTYPES:
        raise ValueError(f"dtype must be one of fp32, fp16, bf16, got {dtype!r}")
    return _TRITON_DTYPES[key]


def _pointers(sig: dict[str, str]) -> tuple[str, ...]:
    return tuple(name for name, ty in sig.items() if ty.startswith("*"))


# --- one kernel per plugin --------------------------------------------------------------------
def topk_routing_aot_kernel(num_experts: int, k: int, scoring: str = "softmax", normalize: int = 0,
                            scale: float = 1.0) -> AotKernel:
    """``moetrt::TopKRouting``: logits -> (weights, indices), scale compiled in."""
    scoring = attribute_text(scoring)
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring must be softmax or sigmoid, got {scoring!r}")
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be in 1..num_experts={num_experts}, got {k}")
    block_t, block_e, num_warps = topk_routing_blocks(None, num_experts)
    sig = {"logits_ptr": "*fp32", "num_tokens": "i32", "weights_ptr": "*fp32", "indices_ptr": "*i32"}
    constants = {"num_experts": num_experts, "SCALE": float(scale), "K": k, "SIGMOID": scoring == "sigmoid",
                 "NORMALIZE": int(normalize), "BLOCK_T": block_t, "BLOCK_E": block_e, "BLOCK_K": next_power_of_2(k)}
    spec = _PluginKernelSpec("topk_routing", "topk_routing_aot", "plugins", sig, constants, num_warps=num_warps,
                             num_stages=1, grid=(f"max(cdiv(T, {block_t}), 1)", "1", "1"), aligned=_pointers(sig))
    return AotKernel("TopKRouting", spec, ("logits_ptr",), ("num_tokens",), ("weights_ptr", "indices_ptr"), num_experts, k)


def moe_align_aot_kernel(num_experts: int, k: int, block_m: int) -> AotKernel:
    """``moetrt::MoEAlign``: indices -> (sorted_ids, expert_ids, num_padded), one program."""
    from moetrt.ops.kernels.sparse_moe_triton import align_block_p

    sig = {"indices_ptr": "*i32", "num_pairs": "i32", "sorted_ids_ptr": "*i32", "expert_ids_ptr": "*i32",
           "num_padded_ptr": "*i32"}
    constants = {"num_experts": num_experts, "BLOCK_M": block_m, "BLOCK_E": next_power_of_2(num_experts),
                 "BLOCK_P": align_block_p(num_experts)}
    spec = _PluginKernelSpec("moe_align", "moe_align_aot", "plugins", sig, constants, num_warps=4, num_stages=1,
                             grid=("1", "1", "1"), aligned=_pointers(sig))
    return AotKernel("MoEAlign", spec, ("indices_ptr",), ("num_pairs",),
                     ("sorted_ids_ptr", "expert_ids_ptr", "num_padded_ptr"), num_experts, k)


def _max_blocks_formula(num_experts: int, k: int, block_m: int) -> str:
    return f"cdiv(T*{k} + min({num_experts}, T*{k})*{block_m - 1}, {block_m})"


def _precision(ty: str) -> dict:
    return {"UPCAST": False, "PRECISION": "ieee" if ty == "fp32" else "tf32"}


def _activation_constants(activation: str | bytes, alpha: float | None, limit: float | None) -> dict:
    """ACTIVATION, ALPHA, LIMIT compiled in (TensorRT's extra arguments are int32): None for SwiGLU's unused two."""
    values = SPARSE_MOE_SPEC.resolve({"activation": attribute_text(activation), "alpha": alpha, "limit": limit})
    clamped = values["activation"] == "clamped_swiglu"
    return {"ACTIVATION": values["activation"], "ALPHA": float(values["alpha"]) if clamped else None,
            "LIMIT": float(values["limit"]) if clamped else None}


def moe_gate_up_aot_kernel(dtype: str, num_experts: int, hidden_size: int, ffn: int, k: int, block_m: int,
                           block_n: int, block_k: int, num_warps: int = 4, num_stages: int = 3,
                           group_m: int = 0, activation: str = "silu", alpha: float | None = None,
                           limit: float | None = None, has_b_gate_up: int = 0) -> AotKernel:
    """``moetrt::MoEGateUp``: (x, w_gate_up, b_gate_up, alignment) -> h = act(gate, up) per pair.

    ``alpha`` / ``limit`` None: the spec's defaults; ``has_b_gate_up`` 0: the bias input is not read.
    """
    ty = _triton_dtype(dtype)
    sig = {"x_ptr": f"*{ty}", "w_ptr": f"*{ty}", "b_ptr": f"*{ty}", "sorted_ids_ptr": "*i32",
           "expert_ids_ptr": "*i32", "num_padded_ptr": "*i32", "num_pairs": "i32", "h_ptr": f"*{ty}"}
    constants = {"D": hidden_size, "F": ffn, "K": k, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                 **_precision(ty), "GROUP_M": group_m, "HAS_BIAS": bool(has_b_gate_up),
                 **_activation_constants(activation, alpha, limit)}
    spec = _PluginKernelSpec("moe_gate_up", "moe_gate_up_aot", "plugins", sig, constants, num_warps=num_warps,
                             num_stages=num_stages, grid=(_max_blocks_formula(num_experts, k, block_m), str(-(-ffn // block_n)), "1"),
                             aligned=_pointers(sig))
    return AotKernel("MoEGateUp", spec,
                     ("x_ptr", "w_ptr", "b_ptr", "sorted_ids_ptr", "expert_ids_ptr", "num_padded_ptr"),
                     ("num_pairs",), ("h_ptr",), num_experts, k)


def moe_down_aot_kernel(dtype: str, num_experts: int, hidden_size: int, ffn: int, k: int, block_m: int,
                        block_n: int, block_k: int, num_warps: int = 4, num_stages: int = 3,
                        group_m: int = 0, has_b_down: int = 0) -> AotKernel:
    """``moetrt::MoEDown``: (h, w_down, b_down, routing weights, alignment) -> weighted per-slot outputs.

    ``has_b_down`` 0: the bias input is not read.
    """
    ty = _triton_dtype(dtype)
    sig = {"h_ptr": f"*{ty}", "w_ptr": f"*{ty}", "b_ptr": f"*{ty}", "routing_ptr": "*fp32", "sorted_ids_ptr": "*i32",
           "expert_ids_ptr": "*i32", "num_padded_ptr": "*i32", "num_pairs": "i32", "out_ptr": f"*{ty}"}
    constants = {"D": hidden_size, "F": ffn, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                 **_precision(ty), "GROUP_M": group_m, "HAS_BIAS": bool(has_b_down)}
    spec = _PluginKernelSpec("moe_down", "moe_down_aot", "plugins", sig, constants, num_warps=num_warps,
                             num_stages=num_stages, grid=(_max_blocks_formula(num_experts, k, block_m), str(-(-hidden_size // block_n)), "1"),
                             aligned=_pointers(sig))
    return AotKernel("MoEDown", spec,
                     ("h_ptr", "w_ptr", "b_ptr", "routing_ptr", "sorted_ids_ptr", "expert_ids_ptr", "num_padded_ptr"),
                     ("num_pairs",), ("out_ptr",), num_experts, k)


def moe_combine_aot_kernel(dtype: str, num_experts: int, hidden_size: int, k: int, block_d: int) -> AotKernel:
    """``moetrt::MoECombine``: (slots, indices) -> y, the K slots of a token summed in fp32, in order."""
    ty = _triton_dtype(dtype)
    sig = {"slots_ptr": f"*{ty}", "indices_ptr": "*i32", "y_ptr": f"*{ty}"}
    constants = {"num_experts": num_experts, "D": hidden_size, "K": k, "BLOCK_D": block_d}
    spec = _PluginKernelSpec("moe_combine", "moe_combine_aot", "plugins", sig, constants,
                             num_warps=4 if block_d >= 512 else 1, num_stages=1,
                             grid=("T", str(-(-hidden_size // block_d)), "1"), aligned=_pointers(sig))
    return AotKernel("MoECombine", spec, ("slots_ptr", "indices_ptr"), (), ("y_ptr",), num_experts, k)


_BUILDERS = {
    "TopKRouting": lambda dtype, a: topk_routing_aot_kernel(a["num_experts"], a["k"], a["scoring"], int(a["normalize"]),
                                                            a["scale"]),
    "MoEAlign": lambda dtype, a: moe_align_aot_kernel(a["num_experts"], a["k"], a["block_m"]),
    "MoEGateUp": lambda dtype, a: moe_gate_up_aot_kernel(dtype, *(a[n] for n in PLUGIN_ATTRIBUTES["MoEGateUp"])),
    "MoEDown": lambda dtype, a: moe_down_aot_kernel(dtype, *(a[n] for n in PLUGIN_ATTRIBUTES["MoEDown"])),
    "MoECombine": lambda dtype, a: moe_combine_aot_kernel(dtype, a["num_experts"], a["hidden_size"], a["k"],
                                                          a["block_d"]),
}


def aot_kernel(plugin: str, dtype: str = "fp32", **attrs) -> AotKernel:
    """The kernel of ``plugin`` from its node attributes (``num_experts`` added for TopKRouting).

    ``dtype``: the model dtype of the MoE plugins' activations (the router is always float32).
    """
    if plugin not in _BUILDERS:
        raise ValueError(f"no AOT kernel for plugin {plugin!r}; plugins: {', '.join(_BUILDERS)}")
    return _BUILDERS[plugin](dtype, attrs)


# --- SparseMoE as four plugins -----------------------------------------------------------------
def sparse_moe_attributes(attributes: Mapping[str, Any] | None = None, biases: Iterable[str] = ()) -> dict[str, Any]:
    """The JIT ``SparseMoE`` plugin's attributes, in registration order, for a node.

    ``attributes``: the node's (``plugin_namespace`` and ``aot`` allowed); the spec fills in
    the defaults it left off and refuses unknown or out-of-range values. ``biases``: the optional
    inputs the node has (``"b_gate_up"``, ``"b_down"``).
    """
    biases = set(biases)
    unknown = sorted(biases - set(BIAS_FLAGS))
    if unknown:
        raise ValueError(f"SparseMoE has no optional input(s) {unknown}; its optional inputs: {list(BIAS_FLAGS)}")
    given = {name: value for name, value in (attributes or {}).items() if name != "aot"}
    given = {name: attribute_text(value) if isinstance(value, (str, bytes)) else value for name, value in given.items()}
    resolved = SPARSE_MOE_SPEC.resolve(given)
    values = {name: resolved[name] for name in SPARSE_MOE_ATTRIBUTES}
    values.update({flag: int(name in biases) for name, flag in BIAS_FLAGS.items()})
    assert tuple(values) == PLUGIN_ATTRIBUTES["SparseMoE"], tuple(values)
    return values


def sparse_moe_plan(hidden_size: int, ffn: int, num_experts: int, k: int, num_tokens: int,
                    element_size: int = 2, config: SparseMoEConfig | None = None,
                    attributes: Mapping[str, Any] | None = None, biases: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """The attributes of the four plugins that replace one SparseMoE node, in registration order.

    Block sizes come from the kernels' table for ``num_tokens`` tokens (the engine's optimal
    batch x sequence), as the torch back end picks them per call; an engine keeps one choice.
    ``attributes`` / ``biases``: the node's attributes and optional inputs, as for
    :func:`sparse_moe_attributes` (default: SwiGLU without biases).
    """
    config = config or sparse_moe_config(num_tokens, num_experts, k, element_size)
    gate_up, down = config.gate_up, config.down
    block_d = min(config.combine_block_d, next_power_of_2(hidden_size))
    op = sparse_moe_attributes(attributes, biases)
    gemm = {"num_experts": num_experts, "hidden_size": hidden_size, "ffn": ffn, "k": k, "block_m": config.block_m}
    plan = {
        "MoEAlign": {"num_experts": num_experts, "k": k, "block_m": config.block_m},
        "MoEGateUp": {**gemm, "block_n": gate_up.block_n, "block_k": gate_up.block_k, "num_warps": gate_up.num_warps,
                      "num_stages": gate_up.num_stages, "group_m": gate_up.group_m,
                      **{name: op[name] for name in SPARSE_MOE_ATTRIBUTES},
                      BIAS_FLAGS["b_gate_up"]: op[BIAS_FLAGS["b_gate_up"]]},
        "MoEDown": {**gemm, "block_n": down.block_n, "block_k": down.block_k, "num_warps": down.num_warps,
                    "num_stages": down.num_stages, "group_m": down.group_m,
                    BIAS_FLAGS["b_down"]: op[BIAS_FLAGS["b_down"]]},
        "MoECombine": {"num_experts": num_experts, "hidden_size": hidden_size, "k": k, "block_d": block_d},
    }
    assert all(tuple(plan[p]) == PLUGIN_ATTRIBUTES[p] for p in plan), plan
    return plan


def max_blocks(num_pairs, num_experts: int, block_m: int, ops=INT_OPS):
    """Blocks of ``block_m`` slots the alignment can need (as ``sparse_moe_triton.max_aligned_blocks``)."""
    return ops.cdiv(num_pairs + ops.min(num_experts, num_pairs) * (block_m - 1), block_m)


def launch_grid(kernel: AotKernel, num_tokens, ops=INT_OPS) -> tuple:
    """The grid of ``kernel`` for ``num_tokens`` tokens: an int, or with ``ops`` = (trtp.cdiv, trtp.min,
    trtp.max) a TensorRT shape expression, so the engine and the tests use one formula."""
    c = kernel.spec.constants
    if kernel.plugin == "TopKRouting":
        return ops.max(ops.cdiv(num_tokens, c["BLOCK_T"]), 1), 1, 1
    if kernel.plugin == "MoEAlign":
        return 1, 1, 1
    if kernel.plugin == "MoEGateUp":
        return max_blocks(num_tokens * kernel.k, kernel.num_experts, c["BLOCK_M"], ops), -(-c["F"] // c["BLOCK_N"]), 1
    if kernel.plugin == "MoEDown":
        return max_blocks(num_tokens * kernel.k, kernel.num_experts, c["BLOCK_M"], ops), -(-c["D"] // c["BLOCK_N"]), 1
    if kernel.plugin == "MoECombine":
        return num_tokens, -(-c["D"] // c["BLOCK_D"]), 1
    raise AssertionError(kernel.plugin)


# --- compile -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompiledKernel:
    """What a TensorRT AOT plugin returns for one kernel, plus its resource use."""

    entry: str  # the PTX entry name (kernel_name of aot_impl)
    ptx: str  # with exactly ``num_params`` parameters
    num_params: int
    shared: int  # bytes of dynamic shared memory per block
    block: int  # threads per block (num_warps * 32)
    num_warps: int
    target: str  # "sm_90"
    meta: dict[str, Any]


_COMPILED: dict[tuple[str, tuple[int, int]], CompiledKernel] = {}


def strip_unused_params(ptx: str, entry: str, keep: int) -> str:
    """Drop the parameters of ``entry`` after the first ``keep``; they must be unused in the PTX."""
    match = re.search(rf"\.entry\s+{re.escape(entry)}\s*\((.*?)\)", ptx, re.S)
    if match is None:
        raise ValueError(f"no .entry {entry} in the PTX")
    params = [p.strip() for p in match.group(1).split(",") if p.strip()]
    if len(params) < keep:
        raise ValueError(f"{entry} has {len(params)} parameters, fewer than the {keep} TensorRT passes")
    names = [p.split()[-1] for p in params]
    body = ptx[match.end():]
    used = [name for name in names[keep:] if re.search(rf"\b{re.escape(name)}\b", body)]
    if used:
        raise ValueError(
            f"{entry} reads its hidden Triton parameters {used} (global/profile scratch), which a TensorRT AOT "
            "plugin cannot provide; use plugins='jit' or a Triton version whose kernels need no scratch"
        )
    kept = ",\n".join(f"\t{p}" for p in params[:keep])
    return ptx[: match.start(1)] + "\n" + kept + "\n" + ptx[match.end(1):]


# TensorRT's AOT launcher is not documented to opt kernels into more than the default 48 KiB of
# dynamic shared memory (cudaFuncAttributeMaxDynamicSharedMemorySize), so the AOT kernels stay
# within it: a kernel over the limit is recompiled with fewer pipeline stages, then shorter K tiles
# (neither changes what it computes).
MAX_AOT_SHARED = 48 * 1024


def _smaller(kernel: AotKernel) -> AotKernel | None:
    """The same kernel with one fewer pipeline stage, else half the K tile; None when neither shrinks."""
    from dataclasses import replace

    spec = kernel.spec
    if spec.num_stages > 1:
        return replace(kernel, spec=replace(spec, num_stages=spec.num_stages - 1))
    if spec.constants.get("BLOCK_K", 0) > 16 and kernel.plugin in ("MoEGateUp", "MoEDown"):
        constants = dict(spec.constants, BLOCK_K=spec.constants["BLOCK_K"] // 2)
        return replace(kernel, spec=replace(spec, constants=constants, num_stages=3))
    return None


def compile_aot_kernel(kernel: AotKernel, capability: tuple[int, int] = (9, 0),
                       max_shared: int = MAX_AOT_SHARED) -> CompiledKernel:
    """Compile ``kernel`` for the GPU of compute ``capability`` (no GPU needed); cached per process.

    The PTX keeps exactly the parameters TensorRT passes (inputs, extras, outputs); a kernel
    needing more than ``max_shared`` bytes of shared memory is recompiled smaller (see above).
    """
    from moetrt.ops.kernels.compile import compile_spec

    key = (kernel.key(), tuple(capability), max_shared)
    if key in _COMPILED:
        return _COMPILED[key]
    fn = kernel.spec.jit_function()
    runtime = [name for name in fn.arg_names if name not in kernel.spec.constants]
    expected = [*kernel.inputs, *kernel.extras, *kernel.outputs]
    assert runtime == expected, f"{kernel.plugin}: kernel parameters {runtime} are not in TensorRT's order {expected}"
    cc = capability[0] * 10 + capability[1]
    candidate, result = kernel, None
    while candidate is not None:
        result = compile_spec(candidate.spec, target=("cuda", cc, 32))
        if int(result["shared"]) <= max_shared:
            break
        candidate = _smaller(candidate)
    if int(result["shared"]) > max_shared:
        raise RuntimeError(f"{kernel.plugin}: the kernel needs {result['shared']} bytes of shared memory even at one "
                           f"stage, more than the {max_shared} an AOT plugin may use; build with plugins='jit'")
    scratch = {name: result.get(name) or 0 for name in ("global_scratch_size", "profile_scratch_size")}
    if any(scratch.values()):
        raise RuntimeError(f"{kernel.plugin}: the kernel needs Triton scratch memory {scratch}, which an AOT "
                           "plugin cannot provide; build with plugins='jit'")
    ptx = strip_unused_params(result["ptx"], result["entry"], kernel.num_params)
    compiled = CompiledKernel(
        entry=result["entry"], ptx=ptx, num_params=kernel.num_params, shared=int(result["shared"]),
        block=int(result["block"][0]), num_warps=int(result["num_warps"]), target=result["target"],
        meta={"registers": result["registers"], "constants": result["constants"], "num_stages": candidate.spec.num_stages},
    )
    _COMPILED[key] = compiled
    return compiled
