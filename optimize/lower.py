"""Per-target lowering: a canonical export folder -> an optimized folder for ONNX Runtime.

    moetrt.optimize.optimize("exported/tiny", "optimized/tiny", target="ort-cpu")
    moetrt.optimize.optimize("exported/tiny", "optimized/tiny-int4", quantize_experts="int4")

The optimized folder keeps the I/O contract of an export in the output precision (same input
and output names and axes; KV cache in that precision, logits float32), so the runtime runs it
unchanged. Its ``moetrt.json`` is the source's with ``export.target`` set, ``export.dtype`` the
output precision, ``io`` read back from the written graph, and an ``optimize`` section listing
every pass applied with its count and the layers it left alone (and why).

Passes run in this order, each on the graph the previous one wrote:

1. :func:`~moetrt.optimize.precision.convert_precision` (``precision`` fp16/bf16 of an fp32 export);
2. :func:`~moetrt.optimize.expert_quantization.quantize_experts` (``quantize_experts``): layers -> QMoE;
3. :func:`~moetrt.optimize.moe_lowering.lower_moe`: the remaining layers -> MoE where the target
   runs it (ort-cpu: float32; ort-cuda: float16/bfloat16).

Requirements are checked before any heavy work and fail with :class:`moetrt.MoetrtError`
naming what is missing: ONNX Runtime installed and recent enough for the target's fused ops,
the CUDA execution provider for ``ort-cuda``, and a QMoE with block-wise quantization for
``quantize_experts``. ``check_runtime=False`` skips them, to build for a machine other than
this one (the folder records that it was not checked).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import onnx_ir as ir

from moetrt.artifact import (
    Progress, atomic_output_dir, check_output_dir, package_versions, read_metadata, sha256_file, write_metadata,
)
from moetrt.errors import BackendMissingError, MoetrtError

from ._common import PassResult
from .moe_lowering import lower_moe
from .precision import convert_precision
from .expert_quantization import quantize_experts as quantize_experts_pass  # the keyword argument takes the name
from .targets import (
    DEFAULT_BLOCK_SIZE, EXPERT_ACTIVATIONS, MOE_LOWERING, resolve_precision, PRECISIONS, QUANTIZE_EXPERTS, TARGETS,
    TargetSpec,
)

__all__ = ["optimize", "TARGETS", "PRECISIONS", "QUANTIZE_EXPERTS", "TargetSpec", "check_requirements"]

EXTERNAL_DATA_THRESHOLD = 1 << 30  # as the export: weights above 1 GiB go to model.onnx.data
_ONNX_DTYPE_NAMES = {
    ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16",
    ir.DataType.INT64: "int64", ir.DataType.INT32: "int32",
}
_QMOE_ATTRIBUTES = ("block_size", "weights_prepacked", "swiglu_fusion", "expert_weight_bits")


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts + [0] * (3 - len(parts)))


def check_requirements(target: str, quantize: str | None) -> dict[str, Any]:
    """Fail with a :class:`MoetrtError` naming the first requirement of ``target`` this machine lacks."""
    spec = TARGETS[target]
    package = spec.package
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendMissingError(
            f"--target {target} needs ONNX Runtime, which is not installed: pip install '{package}>="
            f"{'.'.join(map(str, spec.min_ort))}' (or pass check_runtime=False / --no-check-runtime to build "
            "for another machine)"
        ) from exc
    have = _version_tuple(ort.__version__)
    need = ".".join(map(str, spec.min_ort))
    if have < spec.min_ort:
        raise MoetrtError(
            f"--target {target} needs ONNX Runtime >= {need} for {spec.why_min_ort}; this machine has "
            f"{ort.__version__}: pip install -U '{package}>={need}'"
        )
    providers = ort.get_available_providers()
    if spec.provider not in providers:
        raise MoetrtError(
            f"--target {target} needs ONNX Runtime's {spec.provider}, which onnxruntime {ort.__version__} here "
            f"lacks (it has {', '.join(providers)}): pip uninstall onnxruntime && pip install '{package}>={need}' "
            "on a machine with an NVIDIA GPU, or pass check_runtime=False (--no-check-runtime) to build the "
            "folder here for another machine"
        )
    if quantize is not None:
        from onnxruntime.capi import onnxruntime_pybind11_state as C

        schemas = C.get_all_operator_schema()
        schema = next((s for s in schemas if s.name == "QMoE" and s.domain == "com.microsoft"), None)
        missing = [a for a in _QMOE_ATTRIBUTES if schema is None or a not in schema.attributes]
        if schema is not None and "router_weights" not in [i.name for i in schema.inputs]:
            missing.append("input router_weights")
        if missing:
            raise MoetrtError(
                f"--quantize-experts {quantize} needs ONNX Runtime's com.microsoft::QMoE with block-wise "
                f"quantization (attributes {', '.join(missing)}), which onnxruntime {ort.__version__} lacks: "
                f"pip install -U '{package}'"
            )
    return {"onnxruntime": ort.__version__, "providers": providers}


def _io_from_graph(model: ir.Model) -> dict[str, list[dict[str, Any]]]:
    """The graph's inputs and outputs in the ``io`` format of ``moetrt.json``."""

    def spec(value: ir.Value) -> dict[str, Any]:
        dims = [d if isinstance(d, int) else str(d) for d in (value.shape or ())]
        return {"name": value.name, "dtype": _ONNX_DTYPE_NAMES.get(value.dtype, str(value.dtype)), "shape": dims}

    return {"inputs": [spec(v) for v in model.graph.inputs], "outputs": [spec(v) for v in model.graph.outputs]}


def _count_nodes(model: ir.Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in ("", "ai.onnx"):
            key = f"{node.domain}::{node.op_type}"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _check_contract(before: dict, after: dict, dtype_name: str) -> None:
    """Same names, axes and order; float KV in the new dtype, logits float32 (an internal invariant)."""
    for side in ("inputs", "outputs"):
        old, new = before[side], after[side]
        assert [t["name"] for t in old] == [t["name"] for t in new], (side, old, new)
        for o, n in zip(old, new):
            assert o["shape"] == n["shape"] or not o["shape"], (o, n)
            if o["dtype"] in ("float32", "float16", "bfloat16") and o["name"].startswith(("past_", "present")):
                assert n["dtype"] == dtype_name, (o, n)
            else:
                assert n["dtype"] == o["dtype"], (o, n)


def optimize(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    target: str = "ort-cpu",
    *,
    precision: str | None = None,
    quantize_experts: str | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    expert_activations: str = "int8",
    moe_lowering: str | None = None,
    overwrite: bool = False,
    check_runtime: bool = True,
    progress: bool = True,
    **trt_options,
) -> Path:
    """Optimize the canonical export in ``src_dir`` for ``target`` into ``out_dir``; returns ``out_dir``.

    ``target``: ort-cpu | ort-cuda | trt (a TensorRT engine folder: see
    :func:`moetrt.optimize.trt.engine_from_onnx`, which takes ``trt_options`` such as ``profile``,
    ``timing_cache`` and ``plugins``). ``precision``: fp32 | fp16 | bf16 (default: the export's);
    fp16/bf16 convert an fp32 export, keeping router, softmax and logits fp32.
    ``quantize_experts``: None | int8 | int4, weight-only block-wise (``block_size``, default 32)
    experts lowered to ``com.microsoft::QMoE``; ``expert_activations`` (ort-cpu): int8 (the
    kernel rounds activations to int8 per block: faster decode; int8 experts always do) | fp32
    (int4 experts on fp32 activations, exactly the dequantized weights' math).
    ``moe_lowering``: auto (the fused MoE op for decode-sized steps, the function body for
    prefill; see ``moe_lowering``) | always | off; default: auto for ort-cpu, always for ort-cuda.
    ``check_runtime=False`` skips the requirement checks, to build for another machine.
    """
    if target == "trt":
        if quantize_experts is not None:
            raise MoetrtError("--quantize-experts applies to the ONNX Runtime targets; TensorRT engines keep the experts' dtype")
        from .trt import engine_from_onnx

        return engine_from_onnx(src_dir, out_dir, precision=precision, overwrite=overwrite, progress=progress,
                                **trt_options)
    if trt_options:
        raise MoetrtError(f"{', '.join(sorted(trt_options))} apply to --target trt only")
    if target not in TARGETS:
        raise MoetrtError(f"unknown target {target!r}; choose one of {', '.join((*TARGETS, 'trt'))}")
    if precision is not None and precision not in PRECISIONS:
        raise MoetrtError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if quantize_experts is not None and quantize_experts not in QUANTIZE_EXPERTS:
        raise MoetrtError(
            f"unknown expert quantization {quantize_experts!r}; choose one of {', '.join(QUANTIZE_EXPERTS)}"
        )
    if moe_lowering is None:
        moe_lowering = TARGETS[target].moe_policy
    if moe_lowering not in MOE_LOWERING:
        raise MoetrtError(f"unknown moe_lowering {moe_lowering!r}; choose one of {', '.join(MOE_LOWERING)}")
    if expert_activations not in EXPERT_ACTIVATIONS:
        raise MoetrtError(f"unknown expert_activations {expert_activations!r}; choose one of "
                          f"{', '.join(EXPERT_ACTIVATIONS)}")
    if block_size < 16 or block_size & (block_size - 1):
        raise MoetrtError(f"block_size must be a power of two >= 16 (QMoE's rule), got {block_size}")

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    meta = read_metadata(src_dir)
    export = dict(meta.get("export") or {})
    if meta.get("format") != "moetrt-onnx" or export.get("target", "canonical") != "canonical":
        raise MoetrtError(
            f"{src_dir} holds a {export.get('target', meta.get('format'))!r} artifact; optimize starts from the "
            "canonical export: pass the folder written by `moetrt export`"
        )
    source_dtype = export.get("dtype", "fp32")
    precision = resolve_precision(src_dir, export, precision)
    if src_dir.resolve() == out_dir.resolve():
        raise MoetrtError(f"the output folder must differ from the source folder {src_dir}")
    check_output_dir(out_dir, overwrite)
    spec = TARGETS[target]
    moe_dtypes = tuple(ir.DataType[name] for name in spec.moe_dtypes)
    runtime = check_requirements(target, quantize_experts) if check_runtime else None

    stages = ["load", *(["precision"] if precision != source_dtype else []),
              *(["quantize experts"] if quantize_experts else []), *(["lower MoE"] if moe_lowering != "off" else []),
              "save"]
    steps = Progress(stages, enabled=progress, title="optimize")
    with steps.stage("load", str(src_dir / "model.onnx")):
        model = ir.load(src_dir / "model.onnx")
    io_before = meta.get("io") or _io_from_graph(model)
    results: list[PassResult] = []
    if precision != source_dtype:
        with steps.stage("precision", f"{source_dtype} -> {precision}"):
            results.append(convert_precision(model, precision))
    if quantize_experts:
        with steps.stage("quantize experts", f"{quantize_experts}, blocks of {block_size}"):
            accuracy = EXPERT_ACTIVATIONS[expert_activations] if target == "ort-cpu" else None
            results.append(quantize_experts_pass(model, quantize_experts, block_size, moe_dtypes, accuracy))
    if moe_lowering != "off":
        with steps.stage("lower MoE", f"com.microsoft::MoE, policy {moe_lowering}"):
            results.append(lower_moe(model, moe_dtypes, policy=moe_lowering))

    with steps.stage("save", str(out_dir)), atomic_output_dir(out_dir, overwrite) as tmp:
        model.producer_name = "moetrt"
        weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
        use_external = bool(export.get("external_data")) or weight_bytes > EXTERNAL_DATA_THRESHOLD
        ir.save(model, tmp / "model.onnx", external_data="model.onnx.data" if use_external else None)
        io_after = _io_from_graph(model)
        _check_contract(io_before, io_after, {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[precision])
        copied = []
        for name in meta.get("tokenizer_files", []):
            if (src_dir / name).exists():
                shutil.copy2(src_dir / name, tmp / name)
                copied.append(name)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        export.update(target=target, dtype=precision, external_data=use_external, nodes=_count_nodes(model),
                      domain={d: v for d, v in model.opset_imports.items() if d not in ("", "ai.onnx")})
        write_metadata(tmp, {
            **meta,
            "export": export,
            "io": io_after,
            "optimize": {
                "source": str(src_dir.resolve()),
                "source_files": meta.get("files", {}),
                "target": target,
                "execution_provider": spec.provider,
                "precision": precision,
                "quantize_experts": quantize_experts,
                "block_size": block_size if quantize_experts else None,
                "expert_activations": expert_activations if quantize_experts and target == "ort-cpu" else None,
                "moe_lowering": moe_lowering,
                "passes": [r.to_dict() for r in results],
                "runtime_checked": runtime,
            },
            "tokenizer_files": copied,
            "versions": package_versions(),
            "files": files,
        })
    steps.done(f"optimized for {target} into {out_dir}: " + "; ".join(str(r) for r in results))
    return out_dir

