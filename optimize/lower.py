"""Per-target lowering: a canonical export folder -> an optimized folder for ONNX Runtime.

    moetrt.optimize.optimize("exported/tiny", "optimized/tiny", target="ort-cpu")
    moetrt.optimize.optimize("exported/tiny", "optimized/tiny-int4", quantize_experts="int4")
    moetrt.optimize.optimize("exported/tiny", "optimized/tiny-q", quantize_experts="int4", quantize_weights="int8")
    moetrt.optimize.optimize("exported/tiny", "optimized/tiny-last", last_logits=True)

The optimized folder keeps the I/O contract of an export in the output precision (same input
and output names and axes; KV cache in that precision, logits float32), so the runtime runs it
unchanged (``last_logits`` is the one exception: ``logits`` becomes [B, 1, V], the last position's,
which is all the generate loop reads; ``io`` and ``optimize.last_logits`` say so). Its
``moetrt.json`` is the source's with ``export.target`` set, ``export.dtype`` the
output precision, ``io`` read back from the written graph, and an ``optimize`` section listing
every pass applied with its count and the layers it left alone (and why).

Passes run in this order, each on the graph the previous one wrote:

1. :func:`~moetrt.optimize.last_logits.last_logits` (``last_logits``): the hidden states sliced to the
   last position before the final norm and the lm_head (first, on the exported graph, whose pattern it knows);
2. :func:`~moetrt.optimize.precision.convert_precision` (``precision`` fp16/bf16 of an fp32 export);
3. :func:`~moetrt.optimize.transformer_fusions.fuse_norms` (``fuse_norms``): RMSNorms (and the
   residual adds before them) -> ONNX Runtime's SimplifiedLayerNormalization kernels;
4. :func:`~moetrt.optimize.weight_quantization.quantize_weights` (``quantize_weights``): the
   non-expert, non-router linear layers -> MatMulNBits;
5. :func:`~moetrt.optimize.expert_quantization.quantize_experts` (``quantize_experts``): layers -> QMoE;
6. :func:`~moetrt.optimize.moe_lowering.lower_moe`: the remaining layers -> MoE where the target
   runs it (ort-cpu: float32; ort-cuda: float16/bfloat16);
7. :func:`~moetrt.optimize.linear_attention.lower_linear_attention` (ort-cpu, graphs with a ``Scan``:
   hybrid linear-attention models): the Gated DeltaNet's delta-rule Scan -> ``com.microsoft::LinearAttention``.

Requirements are checked before any heavy work and fail with :class:`moetrt.MoetrtError`
naming what is missing: ONNX Runtime installed and recent enough for the target's fused ops,
the CUDA execution provider for ``ort-cuda``, and a QMoE with block-wise quantization for
``quantize_experts`` (``com.microsoft::MatMulNBits`` for ``quantize_weights``). ``check_runtime=False`` skips them, to build for a machine other than
this one (the folder records that it was not checked).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx_ir as ir

from moetrt.artifact import (
    Progress, atomic_output_dir, check_artifact_files, check_output_dir, package_versions, read_metadata, write_artifact,
)
from moetrt.dtypes import ONNX_ELEM_TYPES, element_name, from_onnx
from moetrt.errors import BackendMissingError, MoetrtError

from ._common import PassResult, load_model, save_model
from .moe_lowering import lower_moe
from .precision import convert_precision
from .expert_quantization import quantize_experts as quantize_experts_pass  # the keyword argument takes the name
from .last_logits import last_logits as last_logits_pass
from .linear_attention import lower_linear_attention
from .transformer_fusions import fuse_norms as fuse_norms_pass
from .weight_quantization import quantize_weights as quantize_weights_pass
from .grouped_attention import group_attention as group_attention_pass
from .targets import (
    DEFAULT_BLOCK_SIZE, DEFAULT_WEIGHT_BLOCK_SIZE, ENGINE_TARGETS, EXPERT_ACTIVATIONS, MOE_LOWERING, resolve_precision,
    PRECISIONS, QUANTIZE_EXPERTS, QUANTIZE_WEIGHTS, TARGETS, WEIGHT_ACTIVATIONS, TargetSpec,
)

__all__ = ["optimize", "TARGETS", "PRECISIONS", "QUANTIZE_EXPERTS", "QUANTIZE_WEIGHTS", "TargetSpec",
           "check_requirements"]

EXTERNAL_DATA_THRESHOLD = 1 << 30  # as the export: weights above 1 GiB go to model.onnx.data
_ONNX_DTYPE_NAMES = {
    **{ir.DataType(elem): element_name(dtype) for dtype, elem in ONNX_ELEM_TYPES.items()},
    ir.DataType.INT64: "int64", ir.DataType.INT32: "int32",
}
_QMOE_ATTRIBUTES = ("block_size", "weights_prepacked", "swiglu_fusion", "expert_weight_bits")
_QMOE_MIN_ORT = (1, 32, 0)  # the QMoE layout below runs on 1.32; 1.30 accepts the schema but not the node


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts + [0] * (3 - len(parts)))


def check_requirements(target: str, quantize: str | None, quantize_weights: str | None = None) -> dict[str, Any]:
    """Fail with a :class:`MoetrtError` naming the first requirement of ``target`` this machine lacks."""
    spec = TARGETS[target]
    package = spec.package
    try:
        import onnxruntime as ort
    except ImportError as exc:
        message = (f"{{}} needs ONNX Runtime, which is not installed: pip install '{package}>="
                   f"{'.'.join(map(str, spec.min_ort))}' (or pass {{}} to build for another machine)")
        raise BackendMissingError(message.format(f"target={target!r}", "check_runtime=False"),
                                  cli=message.format(f"--target {target}", "--no-check-runtime")) from exc
    have = _version_tuple(ort.__version__)
    need = ".".join(map(str, spec.min_ort))
    if have < spec.min_ort:
        raise MoetrtError(
            f"--target {target} needs ONNX Runtime >= {need} for {spec.why_min_ort}; this machine has "
            f"{ort.__version__}: pip install -U '{package}>={need}'"
        )
    providers = ort.get_available_providers()
    if spec.provider not in providers:
        message = (f"{{}} needs ONNX Runtime's {spec.provider}, which onnxruntime {ort.__version__} here "
                   f"lacks (it has {', '.join(providers)}): pip uninstall onnxruntime && pip install '{package}>={need}' "
                   "on a machine with an NVIDIA GPU, or pass {} to build the folder here for another machine")
        raise MoetrtError(message.format(f"target={target!r}", "check_runtime=False"),
                          cli=message.format(f"--target {target}", "--no-check-runtime"))
    if quantize is not None or quantize_weights is not None:
        from onnxruntime.capi import onnxruntime_pybind11_state as C

        schemas = C.get_all_operator_schema()
    if quantize_weights is not None:
        nbits = next((s for s in schemas if s.name == "MatMulNBits" and s.domain == "com.microsoft"), None)
        if nbits is None or "accuracy_level" not in nbits.attributes:
            raise MoetrtError(
                f"--quantize-weights {quantize_weights} needs ONNX Runtime's com.microsoft::MatMulNBits with "
                f"accuracy_level, which onnxruntime {ort.__version__} lacks: pip install -U '{package}'"
            )
    if quantize is not None:
        if have < _QMOE_MIN_ORT:
            # 1.30 has the attributes below but rejects the node as an invalid graph at session creation
            raise MoetrtError(
                f"--quantize-experts {quantize} writes block-wise com.microsoft::QMoE nodes that ONNX Runtime "
                f"{ort.__version__} rejects; they are verified on >= {'.'.join(map(str, _QMOE_MIN_ORT))}: "
                f"pip install -U '{package}>={'.'.join(map(str, _QMOE_MIN_ORT))}'"
            )
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


def _last_position_logits(io: dict) -> dict:
    """``io`` with the ``logits`` output's sequence axis 1 (what :func:`last_logits_pass` makes of it)."""
    outputs = [dict(t, shape=[t["shape"][0], 1, *t["shape"][2:]]) if t["name"] == "logits" and t["shape"] else t
               for t in io["outputs"]]
    return {**io, "outputs": outputs}


def optimize(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    target: str = "ort-cpu",
    *,
    precision: str | None = None,
    quantize_experts: str | None = None,
    quantize_weights: str | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    weight_block_size: int | None = None,
    expert_activations: str = "int8",
    weight_activations: str = "int8",
    weight_zero_points: bool = False,
    fuse_norms: bool = False,
    group_attention: bool | None = None,
    last_logits: bool = False,
    moe_lowering: str | None = None,
    overwrite: bool = False,
    check_runtime: bool = True,
    progress: bool = True,
    **trt_options,
) -> Path:
    """Optimize the canonical export in ``src_dir`` for ``target`` into ``out_dir``; returns ``out_dir``.

    ``target``: ort-cpu | ort-cuda | trt | trt-rtx (a TensorRT / TensorRT for RTX engine folder:
    see :func:`moetrt.optimize.trt.engine_from_onnx`, which takes ``trt_options`` such as
    ``profile``, ``timing_cache``, ``plugins`` and ``compute_capabilities``). ``precision``: fp32 | fp16 | bf16 (default: the export's);
    fp16/bf16 convert an fp32 export, keeping router, softmax and logits fp32.
    ``quantize_experts``: None | int8 | int4, weight-only block-wise (``block_size``, default 32)
    experts lowered to ``com.microsoft::QMoE``; ``expert_activations`` (ort-cpu): int8 (the
    kernel rounds activations to int8 per block: faster decode; int8 experts always do) | fp32
    (int4 experts on fp32 activations, exactly the dequantized weights' math).
    ``quantize_weights``: None | int8 | int4, weight-only block-wise (``weight_block_size``; default
    128 for int8, ``block_size`` for int4: ``targets.DEFAULT_WEIGHT_BLOCK_SIZE``) attention
    projections, dense MLPs / shared experts and lm_head as ``com.microsoft::MatMulNBits`` (the
    router stays fp32); ``weight_activations`` (ort-cpu): int8 (``accuracy_level=4``: activations
    rounded to int8 per block, the fast CPU kernels) | fp32 (int4 only: ONNX Runtime's CPU kernel
    for int8 weights on fp32 activations dequantizes the whole weight on every call);
    ``weight_zero_points``: a zero point per block (asymmetric) instead of symmetric blocks.
    ``fuse_norms``: RMSNorm -> ``SimplifiedLayerNormalization`` and residual add + RMSNorm ->
    ``com.microsoft::SkipSimplifiedLayerNormalization`` (ONNX Runtime's kernels).
    ``group_attention``: attention multiplies the queries grouped by key/value head, on the cache itself,
    instead of on its heads repeated per query head (``grouped_attention``; ONNX Runtime targets; default:
    on for ort-cpu, where it was measured, off for ort-cuda).
    ``last_logits``: logits of the last position only (``logits`` [B, 1, V]; transformers'
    ``logits_to_keep=1``): the final norm and the lm_head run on one position instead of S in a
    prefill; for generation, not for scoring every position (perplexity).
    ``moe_lowering``: auto (the fused MoE op for decode-sized steps, the function body for
    prefill; see ``moe_lowering``) | always | off; default: auto for ort-cpu, always for ort-cuda.
    ``check_runtime=False`` skips the requirement checks, to build for another machine.
    """
    if target in ENGINE_TARGETS:
        if quantize_experts is not None:
            raise MoetrtError("--quantize-experts applies to the ONNX Runtime targets; TensorRT engines keep the experts' dtype")
        if last_logits:
            raise MoetrtError("--last-logits applies to the ONNX Runtime targets: TensorRT engines are built from the "
                              "canonical export as it is; drop --last-logits or choose --target ort-cpu / ort-cuda")
        if group_attention:  # asked for by name; None (the default) is off for engines
            raise MoetrtError("--group-attention applies to the ONNX Runtime targets: TensorRT engines are built "
                              "from the canonical export as it is; drop --group-attention")
        if fuse_norms:
            raise MoetrtError("--fuse-norms applies to the ONNX Runtime targets (its contrib kernels); TensorRT "
                              "fuses norms itself: drop --fuse-norms")
        if quantize_weights is not None:
            raise MoetrtError(
                "--quantize-weights applies to the ONNX Runtime targets (com.microsoft::MatMulNBits): TensorRT "
                "engines keep the weights' dtype; build with --precision fp16/bf16 for smaller weights, or choose "
                "--target ort-cpu / ort-cuda"
            )
        from .trt import engine_from_onnx

        return engine_from_onnx(src_dir, out_dir, target=target, precision=precision, overwrite=overwrite,
                                progress=progress, **trt_options)
    if trt_options:
        names = sorted(trt_options)
        raise MoetrtError(f"{', '.join(names)} apply to target {' / '.join(map(repr, ENGINE_TARGETS))} only",
                          cli=f"{', '.join('--' + n.replace('_', '-') for n in names)} apply to --target "
                              f"{' / '.join(ENGINE_TARGETS)} only")
    if target not in TARGETS:
        raise MoetrtError(f"unknown target {target!r}; choose one of {', '.join((*TARGETS, *ENGINE_TARGETS))}")
    if precision is not None and precision not in PRECISIONS:
        raise MoetrtError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if group_attention is None:
        group_attention = target == "ort-cpu"
    if quantize_experts is not None and quantize_experts not in QUANTIZE_EXPERTS:
        raise MoetrtError(
            f"unknown expert quantization {quantize_experts!r}; choose one of {', '.join(QUANTIZE_EXPERTS)}"
        )
    if quantize_weights is not None and quantize_weights not in QUANTIZE_WEIGHTS:
        raise MoetrtError(
            f"unknown weight quantization {quantize_weights!r}; choose one of {', '.join(QUANTIZE_WEIGHTS)}"
        )
    if weight_activations not in WEIGHT_ACTIVATIONS:
        raise MoetrtError(f"unknown weight_activations {weight_activations!r}; choose one of "
                          f"{', '.join(WEIGHT_ACTIVATIONS)}")
    if quantize_weights == "int8" and weight_activations == "fp32" and target == "ort-cpu":
        raise MoetrtError(
            "--quantize-weights int8 with --weight-activations fp32: ONNX Runtime's CPU MatMulNBits has no 8-bit "
            "kernel on fp32 activations (it dequantizes the whole weight on every call: 30-100x slower than the "
            "fp32 MatMul on bench-small's shapes); keep --weight-activations int8, or use --quantize-weights int4"
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
    if weight_block_size is None:
        weight_block_size = DEFAULT_WEIGHT_BLOCK_SIZE.get(quantize_weights, block_size)
    if weight_block_size < 16 or weight_block_size & (weight_block_size - 1):
        raise MoetrtError(f"weight_block_size must be a power of two >= 16 (MatMulNBits' rule), got "
                          f"{weight_block_size}", cli=f"--weight-block-size must be a power of two >= 16 (MatMulNBits' rule), "
                              f"got {weight_block_size}")

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
    nbits_dtypes = tuple(ir.DataType[name] for name in spec.nbits_dtypes)
    precision_dtype = ir.DataType(ONNX_ELEM_TYPES[precision])
    if quantize_weights is not None and precision_dtype not in nbits_dtypes:
        names = ", ".join(from_onnx(ir.DataType[n].value) for n in spec.nbits_dtypes)
        raise MoetrtError(
            f"--quantize-weights on --target {target} runs com.microsoft::MatMulNBits in {names} only, not "
            f"{precision}: choose --precision {names.split(', ')[0]}, or --target ort-cuda for bf16"
        )
    runtime = check_requirements(target, quantize_experts, quantize_weights) if check_runtime else None

    stages = ["load", *(["last logits"] if last_logits else []),
              *(["precision"] if precision != source_dtype else []), *(["fuse norms"] if fuse_norms else []),
              *(["group attention"] if group_attention else []),
              *(["quantize weights"] if quantize_weights else []),
              *(["quantize experts"] if quantize_experts else []), *(["lower MoE"] if moe_lowering != "off" else []),
              *(["lower linear attention"] if target == "ort-cpu" else []), "save"]
    steps = Progress(stages, enabled=progress, title="optimize")
    with steps.stage("load", str(src_dir / "model.onnx")):
        check_artifact_files(src_dir, meta, checksums=False, model_only=True)  # a missing weights file fails here
        try:
            model = load_model(src_dir / "model.onnx")  # external weights stay on disk until a pass reads one
        except Exception as exc:  # a protobuf parse error, a bad external-data reference, ...
            check_artifact_files(src_dir, meta, checksums=True, model_only=True)  # changed or truncated: say so
            raise MoetrtError(
                f"{src_dir / 'model.onnx'} cannot be read ({' '.join(str(exc).split())[:200]}); the file is corrupt "
                "or truncated: copy it again or re-export the model"
            ) from exc
    io_before = meta.get("io") or _io_from_graph(model)
    results: list[PassResult] = []
    if last_logits:
        with steps.stage("last logits", "hidden states [B, S, D] -> [B, 1, D] before the final norm and lm_head"):
            results.append(last_logits_pass(model))
        io_before = _last_position_logits(io_before)
    if precision != source_dtype:
        with steps.stage("precision", f"{source_dtype} -> {precision}"):
            results.append(convert_precision(model, precision))
    if fuse_norms:
        with steps.stage("fuse norms", "SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization"):
            results.append(fuse_norms_pass(model))
    if group_attention:
        with steps.stage("group attention", "MatMuls on the key/value heads, not on their repeats"):
            results.append(group_attention_pass(model))
    if quantize_weights:
        with steps.stage("quantize weights", f"{quantize_weights}, blocks of {weight_block_size}"):
            results.append(quantize_weights_pass(
                model, quantize_weights, weight_block_size, symmetric=not weight_zero_points,
                accuracy_level=WEIGHT_ACTIVATIONS[weight_activations] if target == "ort-cpu" else 0,
                dtypes=nbits_dtypes,
            ))
    if quantize_experts:
        with steps.stage("quantize experts", f"{quantize_experts}, blocks of {block_size}"):
            accuracy = EXPERT_ACTIVATIONS[expert_activations] if target == "ort-cpu" else None
            results.append(quantize_experts_pass(model, quantize_experts, block_size, moe_dtypes, accuracy))
    if moe_lowering != "off":
        with steps.stage("lower MoE", f"com.microsoft::MoE, policy {moe_lowering}"):
            results.append(lower_moe(model, moe_dtypes, policy=moe_lowering))
    if target == "ort-cpu":
        with steps.stage("lower linear attention", "delta-rule Scan -> com.microsoft::LinearAttention"):
            if any(node.op_type == "Scan" for node in model.graph):  # only hybrid models' graphs hold one
                results.append(lower_linear_attention(model))

    with steps.stage("save", str(out_dir)), atomic_output_dir(out_dir, overwrite) as tmp:
        model.producer_name = "moetrt"
        weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
        use_external = bool(export.get("external_data")) or weight_bytes > EXTERNAL_DATA_THRESHOLD
        save_model(model, tmp / "model.onnx", use_external, progress=lambda done, total: steps.update(done, total))
        io_after = _io_from_graph(model)
        _check_contract(io_before, io_after, element_name(precision))
        if "state" in io_before:  # the per-layer state contract: the graph's names and axes are unchanged
            io_after["state"] = io_before["state"]
        export.update(target=target, dtype=precision, external_data=use_external, nodes=_count_nodes(model),
                      domain={d: v for d, v in model.opset_imports.items() if d not in ("", "ai.onnx")})
        write_artifact(tmp, {
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
                "quantize_weights": quantize_weights,
                "block_size": block_size if quantize_experts or quantize_weights else None,
                "weight_block_size": weight_block_size if quantize_weights else None,
                "expert_activations": expert_activations if quantize_experts and target == "ort-cpu" else None,
                "weight_activations": weight_activations if quantize_weights and target == "ort-cpu" else None,
                "weight_zero_points": weight_zero_points if quantize_weights else None,
                "fuse_norms": fuse_norms,
                "group_attention": group_attention,
                "last_logits": last_logits,  # logits [B, 1, V]: the last position's only
                "moe_lowering": moe_lowering,
                "passes": [r.to_dict() for r in results],
                "runtime_checked": runtime,
            },
            "versions": package_versions(),
        }, tokenizer_from=src_dir, tokenizer_files=meta.get("tokenizer_files", []), genai=True)
    steps.done(f"optimized for {target} into {out_dir}: " + "; ".join(str(r) for r in results))
    return out_dir

