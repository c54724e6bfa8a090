"""``engine_from_onnx``: an exported folder -> a TensorRT engine folder (engine file + ``moetrt.json``).

    from moetrt.optimize.trt import engine_from_onnx
    engine_from_onnx("exported/tiny", "engines/tiny-fp16", precision="fp16",
                     profile="batch=1:4:8,seq=1:512:4096,past=0:1024:4096")

Stages (each reported on stderr when ``progress``):

1. load the canonical ONNX; fp32 exports are converted to fp16/bf16 by
   :func:`moetrt.optimize.precision.convert_precision` (router, softmax and logits stay fp32);
2. prepare it for TensorRT's parser (:func:`~moetrt.optimize.trt.prepare.prepare_for_tensorrt`:
   plugin attributes, SparseMoE as four AOT plugins, explicit casts, node names);
3. build with Polygraphy's TensorRT loaders (``tools/Polygraphy/polygraphy/backend/trt/``):
   ``NetworkFromOnnxPath(strongly_typed=True)`` (precision comes from the ONNX; TensorRT 11 builds
   only strongly typed networks), ``CreateConfig(profiles=..., load_timing_cache=...,
   progress_monitor=...)`` with one ``Profile`` per ``--profile`` entry, and
   ``EngineBytesFromNetwork(save_timing_cache=...)``, which merges this build's timings into the
   cache file under a lock, so later builds on the same GPU and TensorRT reuse them;
4. save: ``model.engine``, the tokenizer files and ``moetrt.json`` (format ``moetrt-trt``:
   TensorRT version, GPU name and compute capability, profiles, precision, plugin mode, the
   source export's checksums) written atomically.

``target="trt-rtx"`` (TensorRT for RTX, ``tensorrt_rtx``) runs the same stages with no GPU: the
prepare pass keeps the function bodies (``plugins="none"``), the build uses the library's own
builder API for the compute capabilities asked (Polygraphy picks TensorRT or TensorRT for RTX
once per process, from an environment variable), and the folder gains ``layers.json``.

Nothing here imports tensorrt, tensorrt_rtx, triton or polygraphy at module import time.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from moetrt.artifact import Progress, atomic_output_dir, check_output_dir, package_versions, read_metadata, sha256_file, write_artifact
from moetrt.config import MoEConfig
from moetrt.dtypes import DTYPES, element_name, from_onnx
from moetrt.errors import BackendMissingError, CheckpointError, MoetrtError
from moetrt.ops.plugins import (
    ENGINE_FILE,
    ENGINE_FORMAT,
    ENGINE_FORMAT_VERSION,
    PLUGIN_MODES,
    RTX_TARGET,
    device_info,
    import_tensorrt,
    import_tensorrt_rtx,
    register_plugins,
    version_tuple,
)

from ..targets import resolve_precision
from .profiles import parse_profiles

__all__ = ["engine_from_onnx", "PRECISIONS", "precision_flags", "default_timing_cache", "ProgressLog", "io_from_graph",
           "rtx_compute_capabilities", "LAYERS_FILE"]

PRECISIONS = DTYPES
EXTERNAL_DATA_THRESHOLD = 1 << 30  # the prepared ONNX keeps weights beside it above 1 GiB (protobuf's 2 GiB limit)
LAYERS_FILE = "layers.json"  # the network's layers as the builder received them (trt-rtx)
_INT_DTYPE_NAMES = {"INT64": "int64", "INT32": "int32", "BOOL": "bool"}  # onnx_ir DataType names -> io names


def precision_flags(precision: str, strongly_typed: bool) -> dict[str, bool]:
    """Builder precision flags (``CreateConfig`` keywords) for ``precision``.

    A strongly typed network takes its precision from the ONNX and allows no precision flags; a
    weakly typed one (TensorRT 10 only) needs the flag of its reduced precision set to match.
    TF32 stays off either way, so fp32 layers compute in full fp32 as the reference does.
    """
    if precision not in PRECISIONS:
        raise MoetrtError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    flags = {"tf32": False}
    if not strongly_typed and precision != "fp32":
        flags[precision] = True
    return flags


def default_timing_cache(tensorrt_version: str, capability: str) -> Path:
    """Where builds on this GPU and TensorRT version share timings: ``$MOETRT_CACHE_DIR`` or ``~/.cache/moetrt``."""
    root = os.environ.get("MOETRT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "moetrt")
    return Path(root) / "tensorrt" / f"timing-trt{tensorrt_version}-sm{capability.replace('.', '')}.cache"


class ProgressLog:
    """TensorRT's build phases as lines on stderr (the logic of TensorRT's ``IProgressMonitor``).

    Follows ``samples/python/simple_progress_monitor/simple_progress_monitor.py`` (phases nest
    under a parent, ``step_complete`` returns False to cancel, Ctrl-C cancels the build) but
    prints plain lines instead of redrawing the terminal, so logs stay readable; phases deeper
    than ``max_depth`` are not shown, and a phase's steps are reported every ``every`` percent.
    """

    def __init__(self, stream: TextIO | None = None, max_depth: int = 1, every: int = 25):
        self.stream, self.max_depth, self.every = stream or sys.stderr, max_depth, every
        self.phases: dict[str, dict[str, Any]] = {}
        self.cancelled = False

    def _print(self, depth: int, text: str) -> None:
        if depth <= self.max_depth:
            print(f"      {'  ' * depth}{text}", file=self.stream, flush=True)

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        try:
            depth = self.phases[parent_phase]["depth"] + 1 if parent_phase in self.phases else 0
            self.phases[phase_name] = {"depth": depth, "steps": num_steps, "shown": 0, "start": time.perf_counter()}
            self._print(depth, f"{phase_name} ({num_steps} steps)" if num_steps > 1 else phase_name)
        except KeyboardInterrupt:
            self.cancelled = True  # phase_start cannot cancel; step_complete will

    def step_complete(self, phase_name: str, step: int) -> bool:
        try:
            phase = self.phases.get(phase_name)
            if phase and phase["steps"] > 1:
                percent = 100 * (step + 1) // phase["steps"]
                if percent - phase["shown"] >= self.every and percent < 100:
                    phase["shown"] = percent
                    self._print(phase["depth"], f"{phase_name}: {percent}%")
            return not self.cancelled
        except KeyboardInterrupt:
            self.cancelled = True
            return False

    def phase_finish(self, phase_name: str) -> None:
        try:
            phase = self.phases.pop(phase_name, None)
            if phase is not None and phase["depth"] == 0:
                self._print(0, f"{phase_name} done in {time.perf_counter() - phase['start']:.1f} s")
        except KeyboardInterrupt:
            self.cancelled = True


def _progress_monitor(trt, stream: TextIO | None = None):
    """A ``trt.IProgressMonitor`` printing through :class:`ProgressLog`."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.log = ProgressLog(stream)

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.log.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name, step):
            return self.log.step_complete(phase_name, step)

        def phase_finish(self, phase_name):
            self.log.phase_finish(phase_name)

    return Monitor()


def io_from_graph(model) -> dict[str, list[dict[str, Any]]]:
    """The graph inputs and outputs in the ``io`` format of ``moetrt.json``."""

    def spec(value) -> dict[str, Any]:
        dims = [d if isinstance(d, int) else str(d) for d in (value.shape or ())]
        dtype = from_onnx(value.dtype.value)
        name = element_name(dtype) if dtype is not None else _INT_DTYPE_NAMES.get(value.dtype.name, value.dtype.name.lower())
        return {"name": value.name, "dtype": name, "shape": dims}

    return {"inputs": [spec(v) for v in model.graph.inputs], "outputs": [spec(v) for v in model.graph.outputs]}


def _check_source(onnx_dir: Path) -> dict:
    meta = read_metadata(onnx_dir)
    if meta.get("format") == ENGINE_FORMAT:
        raise MoetrtError(f"{onnx_dir} is already a TensorRT engine folder; pass the exported folder (moetrt export)")
    export = meta.get("export") or {}
    if meta.get("format") != "moetrt-onnx" or export.get("target", "canonical") != "canonical":
        raise MoetrtError(
            f"{onnx_dir} holds a {export.get('target', meta.get('format'))!r} artifact; TensorRT engines are built from "
            "the canonical export (the folder `moetrt export` wrote), not from an ONNX Runtime folder"
        )
    if not (onnx_dir / "model.onnx").exists():
        raise MoetrtError(f"{onnx_dir} has no model.onnx; re-export the model")
    return meta


def _import_build_requirements(plugins: str, target: str = "trt") -> Any:
    """tensorrt (>= 10.9), triton and polygraphy (tensorrt_rtx for trt-rtx), or a BackendMissingError naming what to
    install."""
    if target == RTX_TARGET:
        return import_tensorrt_rtx("building a TensorRT for RTX engine")
    trt = import_tensorrt("building a TensorRT engine")
    import importlib.util

    if plugins != "none" and importlib.util.find_spec("triton") is None:
        raise BackendMissingError(
            "building a TensorRT engine needs triton, which compiles the moetrt plugin kernels "
            f"({'into the engine' if plugins == 'aot' else 'that the JIT plugins launch'}): pip install 'moetrt[gpu]'"
        )
    if importlib.util.find_spec("polygraphy") is None:
        raise BackendMissingError("building a TensorRT engine needs Polygraphy: pip install polygraphy")
    return trt


def _profiles(profiles: list[dict]):
    """One Polygraphy ``Profile`` per entry of ``{"shapes": {input: (min, opt, max)}}``."""
    from polygraphy.backend.trt import Profile

    out = []
    for spec in profiles:
        profile = Profile()
        for name, (low, opt, high) in spec["shapes"].items():
            profile.add(name, min=low, opt=opt, max=high)
        out.append(profile)
    return out


def rtx_compute_capabilities(trt, wanted: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """The compute capabilities (``"8.6"``, ...) a TensorRT for RTX engine is built for: ``wanted``, each checked
    against the library's ``ComputeCapability`` enum, or every one it lists from 8.0 on (Turing, 7.5, only when
    asked: TensorRT for RTX compiles no fp32 matrix multiply for it)."""
    known = {}
    for name in trt.ComputeCapability.__members__:
        if name.startswith("SM") and name[2:].isdigit():
            known[f"{name[2:-1]}.{name[-1]}"] = getattr(trt.ComputeCapability, name)
    if wanted is None:
        return [c for c in known if version_tuple(c) >= (8, 0)]
    bad = [c for c in wanted if c not in known]
    if bad or not wanted:
        raise MoetrtError(f"compute capabilities {bad or wanted} are not targets of TensorRT for RTX {trt.__version__}; "
                          f"choose from {', '.join(known)}")
    return list(dict.fromkeys(wanted))


def engine_from_onnx(
    onnx_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    target: str = "trt",
    precision: str | None = "fp16",
    profile: str | None = None,
    timing_cache: str | os.PathLike | bool | None = None,
    plugins: str | None = None,
    compute_capabilities: list[str] | tuple[str, ...] | None = None,
    strongly_typed: bool = True,
    builder_optimization_level: int | None = None,
    device: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Build a TensorRT engine folder ``out_dir`` from the exported folder ``onnx_dir``; returns ``out_dir``.

    ``precision``: fp16 | bf16 | fp32 (None: the export's); an fp32 export is converted, other
    exports keep theirs. ``profile``: ``"batch=MIN:OPT:MAX,seq=...,past=..."``, several separated
    by ``;``; axes left out (or None) take ``DEFAULT_PROFILE`` cut to the model's positions.
    ``timing_cache``: a file reused and updated across builds (None: a per-user cache for this
    GPU and TensorRT version, False: none). ``plugins``: "aot" (kernels baked into the engine,
    which then runs without Python; the default for ``target="trt"``), "jit" (Python plugins;
    loading the engine needs moetrt, torch and triton) or "none" (the nodes' function bodies).

    ``target="trt-rtx"``: TensorRT for RTX (``tensorrt_rtx``), which builds with no GPU for
    ``compute_capabilities`` (e.g. ``["8.6", "12.0"]``; default: every one the library targets from 8.0 on)
    from the function bodies (``plugins="none"``, its only mode: see the README for why its
    Python plugins cannot be used); the folder also holds ``layers.json``, the network's layers as
    the builder received them. ``strongly_typed=False`` builds a weakly typed network with the precision's
    builder flag set instead (TensorRT 10 only). ``device``: CUDA device index (default: current).
    """
    if target not in ("trt", RTX_TARGET):
        raise MoetrtError(f"target must be trt or {RTX_TARGET}, got {target!r}")
    rtx = target == RTX_TARGET
    plugins = plugins or ("none" if rtx else "aot")
    if precision is not None and precision not in PRECISIONS:
        raise MoetrtError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if rtx and plugins != "none":
        raise MoetrtError(f"--target {RTX_TARGET} builds from the function bodies only (plugins='none'): TensorRT for "
                          "RTX has no plugin API moetrt's plugins can use (its parser aborts on a Python plugin); drop "
                          "plugins / --plugins")
    if rtx and timing_cache not in (None, False):
        raise MoetrtError("timing_cache applies to --target trt; TensorRT for RTX builds without timing (no GPU): "
                          "drop timing_cache / --timing-cache")
    if compute_capabilities is not None and not rtx:
        raise MoetrtError(f"compute_capabilities apply to --target {RTX_TARGET}; a trt engine is built for the GPU "
                          "it is built on")
    if plugins not in PLUGIN_MODES:
        raise MoetrtError(f"plugins must be one of {', '.join(PLUGIN_MODES)}, got {plugins!r}")
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    meta = _check_source(onnx_dir)
    export = dict(meta.get("export") or {})
    source_dtype = export.get("dtype", "fp32")
    precision = resolve_precision(onnx_dir, export, precision)
    config = MoEConfig.from_dict(meta["config"])
    specs = parse_profiles(profile, config.max_position_embeddings)
    if onnx_dir.resolve() == out_dir.resolve():
        raise MoetrtError(f"the output folder must differ from the source folder {onnx_dir}")
    check_output_dir(out_dir, overwrite)

    trt = _import_build_requirements(plugins, target)
    trt_version = str(trt.__version__)
    if rtx:  # no GPU: the engine is built for the compute capabilities asked
        if not strongly_typed:
            raise MoetrtError("TensorRT for RTX builds only strongly typed networks; drop strongly_typed=False")
        capabilities = rtx_compute_capabilities(trt, compute_capabilities)
        gpu, cache_path = None, None
    else:
        if not strongly_typed and version_tuple(trt_version)[:1] >= (11,):
            raise MoetrtError(f"TensorRT {trt_version} builds only strongly typed networks; drop strongly_typed=False")
        gpu = device_info(device)
        if plugins != "none":
            register_plugins()
        cache_path = None if timing_cache is False else Path(
            timing_cache if timing_cache not in (None, True) else default_timing_cache(trt_version, gpu["compute_capability"]))

    stages = ["load", *(["precision"] if precision != source_dtype else []), "prepare", "build", "save"]
    steps = Progress(stages, enabled=progress, title="trt")
    import onnx_ir as ir

    with steps.stage("load", str(onnx_dir / "model.onnx")):
        source_sha256 = sha256_file(onnx_dir / "model.onnx")
        recorded = (meta.get("files") or {}).get("model.onnx")
        if recorded is not None and recorded != source_sha256:
            raise CheckpointError(f"{onnx_dir / 'model.onnx'} does not match the checksum in its moetrt.json; it changed "
                                  "after export: re-export the model")
        model = ir.load(onnx_dir / "model.onnx")
    passes = []
    if precision != source_dtype:
        from ..precision import convert_precision

        with steps.stage("precision", f"{source_dtype} -> {precision}"):
            passes.append(convert_precision(model, precision))
    from .prepare import prepare_for_tensorrt

    first = specs[0]
    with steps.stage("prepare", f"plugins {plugins}"):
        passes.append(prepare_for_tensorrt(model, plugins, num_tokens=first.batch.opt * first.seq.opt))
    io = io_from_graph(model)
    if "state" in (meta.get("io") or {}):  # the per-layer state contract of the source export
        io["state"] = meta["io"]["state"]
    profiles = [{"axes": spec.to_dict(), "shapes": spec.shapes(io["inputs"])} for spec in specs]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.onnx-", dir=out_dir.parent) as work:
        onnx_path = Path(work) / "model.trt.onnx"
        weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
        ir.save(model, onnx_path, external_data="model.trt.onnx.data" if weight_bytes > EXTERNAL_DATA_THRESHOLD else None)
        del model
        if rtx:
            detail = f"{len(profiles)} profile(s), {precision}, TensorRT for RTX for sm {', '.join(capabilities)}"
        else:
            detail = f"{len(profiles)} profile(s), {precision}, on {gpu['name']} (sm_{gpu['compute_capability']})"
        with steps.stage("build", detail):
            started = time.perf_counter()
            if rtx:
                engine_bytes, layers = _build_rtx(trt, onnx_path, profiles, capabilities, builder_optimization_level,
                                                  progress)
            else:
                engine_bytes = _build(trt, onnx_path, profiles, precision, strongly_typed, cache_path,
                                      builder_optimization_level, gpu["index"], progress)
            build_seconds = round(time.perf_counter() - started, 2)

    with steps.stage("save", str(out_dir)), atomic_output_dir(out_dir, overwrite) as tmp:
        (tmp / ENGINE_FILE).write_bytes(engine_bytes)
        if rtx:
            (tmp / LAYERS_FILE).write_text(json.dumps(layers, indent=1) + "\n")
        export.update(target=target, dtype=precision)
        write_artifact(tmp, {
            "format": ENGINE_FORMAT,
            "format_version": ENGINE_FORMAT_VERSION,
            "config": meta["config"],
            "export": export,
            "io": io,
            "engine": {
                "file": ENGINE_FILE,
                "precision": precision,
                "plugins": plugins,
                "strongly_typed": strongly_typed,
                "profiles": [{"axes": p["axes"], "shapes": {name: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])}
                                                             for name, s in p["shapes"].items()}} for p in profiles],
                "timing_cache": str(cache_path) if cache_path else None,
                "builder_optimization_level": builder_optimization_level,
                "passes": [r.to_dict() for r in passes],
                "build_seconds": build_seconds,
                "bytes": len(engine_bytes),
                **({"compute_capabilities": capabilities, "layers_file": LAYERS_FILE} if rtx else {}),
            },
            "tensorrt": {"version": trt_version, "package": "tensorrt-rtx" if rtx else "tensorrt"},
            "device": None if rtx else {"name": gpu["name"], "compute_capability": gpu["compute_capability"]},
            "onnx_source": {
                "folder": str(onnx_dir.resolve()),
                "dtype": source_dtype,
                "model_sha256": source_sha256,
                "files": meta.get("files", {}),
            },
            "source": meta.get("source"),
            "versions": package_versions("moetrt", "torch", "onnx", "onnx-ir",
                                         *(("tensorrt-rtx-cu12",) if rtx else ("tensorrt", "polygraphy", "triton"))),
        }, tokenizer_from=onnx_dir, tokenizer_files=meta.get("tokenizer_files", []))
    steps.done(f"built a {'TensorRT for RTX' if rtx else 'TensorRT'} engine into {out_dir}")
    return out_dir


def _build(trt, onnx_path: Path, profiles: list[dict], precision: str, strongly_typed: bool, cache_path: Path | None,
           builder_optimization_level: int | None, device: int, progress: bool) -> bytes:
    """Parse and build with Polygraphy's loaders; TensorRT's own errors become a MoetrtError."""
    import torch
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath
    from polygraphy.logger import G_LOGGER

    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
    config = CreateConfig(
        profiles=_profiles(profiles),
        load_timing_cache=str(cache_path) if cache_path is not None and cache_path.exists() else None,
        progress_monitor=_progress_monitor(trt) if progress else None,
        builder_optimization_level=builder_optimization_level,
        **precision_flags(precision, strongly_typed),
    )
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=strongly_typed)
    build = EngineBytesFromNetwork(network, config=config, save_timing_cache=str(cache_path) if cache_path else None)
    try:
        with torch.cuda.device(device), G_LOGGER.verbosity(G_LOGGER.WARNING if progress else G_LOGGER.ERROR):
            engine = build()
    except Exception as exc:  # Polygraphy raises PolygraphyException after logging TensorRT's errors
        hint = ""
        if "plugin" in str(exc).lower():
            hint = (" A 'plugin not found' error means the moetrt plugins were not registered in this process "
                    "(moetrt.ops.plugins.register_plugins()).")
        raise MoetrtError(f"TensorRT could not build an engine from the prepared model: {exc}.{hint} TensorRT's log "
                          "above names the failing layer; try plugins='jit' if the AOT kernels are at fault") from exc
    return bytes(engine)


def _build_rtx(trt, onnx_path: Path, profiles: list[dict], capabilities: list[str], builder_optimization_level: int | None,
               progress: bool) -> tuple[bytes, dict]:
    """Parse and build with TensorRT for RTX's own API, with no GPU (ahead of time for ``capabilities``).

    Returns the serialized engine and the network's layers (``layers.json``). The steps are the
    library's sample's (``samples/python/``: ``Builder``, ``create_network(0)`` strongly typed,
    ``OnnxParser.parse_from_file``, one ``IOptimizationProfile`` per profile,
    ``IBuilderConfig.set_compute_capability``, ``build_serialized_network``); a parse or build error
    becomes a :class:`MoetrtError` carrying TensorRT's own messages.
    """
    logger = _RecordingLogger(trt, sys.stderr if progress else None)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT for RTX networks are strongly typed
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise MoetrtError("TensorRT for RTX's ONNX parser rejected the prepared model: " + "; ".join(errors[:4]))
    config = builder.create_builder_config()
    config.clear_flag(trt.BuilderFlag.TF32)
    if builder_optimization_level is not None:
        config.builder_optimization_level = builder_optimization_level
    for spec in profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in spec["shapes"].items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    config.num_compute_capabilities = len(capabilities)
    for index, capability in enumerate(capabilities):
        config.set_compute_capability(getattr(trt.ComputeCapability, "SM" + capability.replace(".", "")), index)
    if progress:
        config.progress_monitor = _progress_monitor(trt)
    layers = network_layers(trt, network)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise MoetrtError("TensorRT for RTX could not build an engine from the prepared model: "
                          + ("; ".join(logger.errors[-4:]) or "no error was logged"))
    return bytes(engine), layers


class _RecordingLogger:
    """A TensorRT logger that keeps the errors (for the exception) and prints warnings and errors when asked."""

    def __new__(cls, trt, stream: TextIO | None):
        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity, msg):
                if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                    self.errors.append(msg)
                if stream is not None and severity in (trt.ILogger.Severity.ERROR,
                                                       trt.ILogger.Severity.INTERNAL_ERROR):
                    print(f"      TensorRT: {msg}", file=stream, flush=True)

        return Logger()


def network_layers(trt, network) -> dict:
    """The network's layers as the builder received them: type, name, output shapes and types, and for each
    matrix multiply its operands' shapes (what ``layers.json`` holds)."""
    out = []
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        entry = {"name": layer.name, "type": str(layer.type).split(".")[-1],
                 "outputs": [{"shape": list(layer.get_output(i).shape), "dtype": str(layer.get_output(i).dtype).split(".")[-1]}
                             for i in range(layer.num_outputs)]}
        if layer.type == trt.LayerType.MATRIX_MULTIPLY:
            entry["inputs"] = [list(layer.get_input(i).shape) for i in range(layer.num_inputs)]
        out.append(entry)
    counts: dict[str, int] = {}
    for entry in out:
        counts[entry["type"]] = counts.get(entry["type"], 0) + 1
    return {"source": "network", "num_layers": len(out), "layer_types": dict(sorted(counts.items())), "layers": out}
