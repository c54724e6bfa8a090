"""The TensorRT back end: an engine folder (``moetrt optimize --target trt``) behind the :class:`Backend` interface.

    session = Session("engines/tiny", backend="trt")          # device "cuda" (or "cuda:N")

Every step sets the input shapes on one execution context, points TensorRT at torch CUDA
tensors (``set_tensor_address``) and runs ``execute_async_v3`` on a torch stream. ``present.*``
outputs are torch CUDA tensors sized ``[B, G, P+S, Hd]`` that the generate loop hands back
unchanged as the next step's ``past_key_values.*``, so the KV cache never leaves the GPU;
``logits`` (and router outputs) come back to the host as NumPy arrays.

Before anything runs, the engine's ``moetrt.json`` is checked against this machine: an engine
is tied to the GPU model (compute capability) and TensorRT version it was built with, and a
mismatch is an error that says how to rebuild. Each step's batch / sequence / past lengths must
lie inside one of the engine's optimization profiles.

tensorrt is imported when a back end is created, never at import time of this module.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moetrt.artifact import METADATA_FILE, read_metadata
from moetrt.config import MoEConfig
from moetrt.dtypes import DTYPES, torch_dtype
from moetrt.errors import CheckpointError, MoetrtError
from moetrt.ops.plugins import (
    ENGINE_FILE,
    ENGINE_FORMAT,
    ENGINE_FORMAT_VERSION,
    RTX_TARGET,
    import_tensorrt,
    import_tensorrt_rtx,
    version_tuple,
)
from moetrt.runtime.backend import KV_DTYPES, Feeds, ModelSpec, router_names
from moetrt.runtime.model_folder import read_state
from moetrt.state import StateContract

__all__ = ["TrtBackend", "EngineFolder", "read_engine_folder", "check_engine_compatible", "find_profile", "load_engine"]

AXES = ("batch", "seq", "past", "total")


@dataclass
class EngineFolder:
    """The parsed ``moetrt.json`` of an engine folder."""

    folder: Path
    config: MoEConfig
    dtype: str  # "fp32" | "fp16" | "bf16"
    plugins: str  # "aot" | "jit"
    profiles: list[dict[str, Any]]  # [{"axes": {"batch": [min, opt, max], ...}, "shapes": {...}}]
    router_outputs: bool
    meta: dict[str, Any] = field(repr=False)
    runtime: Any = field(default=None, repr=False)  # the tensorrt.Runtime that deserialized the engine, kept alive with it

    @property
    def engine_path(self) -> Path:
        return self.folder / self.meta.get("engine", {}).get("file", ENGINE_FILE)

    @property
    def rtx(self) -> bool:
        """Whether TensorRT for RTX built the engine (``moetrt optimize --target trt-rtx``)."""
        return (self.meta.get("tensorrt") or {}).get("package") == "tensorrt-rtx"

    @property
    def state(self) -> StateContract:
        """What each layer carries between steps (``io.state``; key/value for folders built before it)."""
        return StateContract.read(self.meta, self.config)


def read_engine_folder(folder: str | os.PathLike) -> EngineFolder:
    """Read and check an engine folder's ``moetrt.json``; the engine file must be present."""
    folder = Path(folder)
    meta = read_metadata(folder)
    meta_path = folder / METADATA_FILE
    if meta.get("format") == "moetrt-onnx":
        raise MoetrtError(
            f"{folder} is an exported ONNX folder, not a TensorRT engine; build an engine from it first "
            f"(moetrt optimize {folder} --target trt -o ENGINE_DIR) and pass ENGINE_DIR, or use backend='ort'"
        )
    if meta.get("format") != ENGINE_FORMAT:
        raise CheckpointError(f"{meta_path} describes a {meta.get('format')!r} artifact; the trt back end runs "
                              f"{ENGINE_FORMAT!r} folders (moetrt optimize --target trt)")
    if meta.get("format_version") != ENGINE_FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path} has format_version {meta.get('format_version')!r}; this moetrt reads version "
            f"{ENGINE_FORMAT_VERSION}: rebuild the engine with this moetrt (moetrt optimize --target trt)"
        )
    try:
        config = MoEConfig.from_dict(meta["config"])
        engine = meta["engine"]
        dtype, plugins, profiles = engine["precision"], engine["plugins"], engine["profiles"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{meta_path} is incomplete ({exc}); rebuild the engine") from exc
    if dtype not in DTYPES or not profiles:
        raise CheckpointError(f"{meta_path}: precision {dtype!r} / {len(profiles)} profiles are not valid; rebuild the engine")
    read_state(meta, config, meta_path)
    result = EngineFolder(folder, config, dtype, plugins, profiles,
                          router_outputs=bool((meta.get("export") or {}).get("router_outputs", False)), meta=meta)
    if not result.engine_path.exists():
        raise CheckpointError(f"{folder} has no {result.engine_path.name} (listed in {METADATA_FILE}); the folder is "
                              "incomplete: copy the whole folder or rebuild the engine")
    return result


def check_engine_compatible(meta: dict[str, Any], tensorrt_version: str, device_name: str | None,
                            capability: str | None) -> None:
    """Raise a :class:`MoetrtError` with a rebuild hint when the engine was built for another GPU or TensorRT.

    TensorRT engines are specific to the GPU model (compute capability) and the TensorRT version
    that built them (unless built version- or hardware-compatible, which moetrt does not do).
    A different GPU name with the same compute capability loads, but may run tactics tuned for
    the other GPU; that only prints a warning. ``capability`` None checks the version only (a
    TensorRT for RTX engine, built for several GPUs: :func:`check_rtx_engine`).
    """
    built_trt = str((meta.get("tensorrt") or {}).get("version", "?"))
    device = meta.get("device") or {}
    built_cc, built_name = str(device.get("compute_capability", "?")), device.get("name", "?")
    source = (meta.get("onnx_source") or {}).get("folder") or "EXPORTED_DIR"
    target = (meta.get("export") or {}).get("target", "trt")
    rebuild = (f"rebuild it on this machine: moetrt optimize {source} --target {target} -o NEW_DIR "
               f"(or moetrt.optimize.trt.engine_from_onnx)")
    if version_tuple(built_trt)[:3] != version_tuple(tensorrt_version)[:3]:
        raise MoetrtError(f"the engine was built with TensorRT {built_trt}, and this machine has TensorRT "
                          f"{tensorrt_version}; engines do not load across TensorRT versions: {rebuild}")
    if capability is None:  # TensorRT for RTX: built for a list of compute capabilities (check_rtx_engine)
        return
    if built_cc != capability:
        raise MoetrtError(f"the engine was built for {built_name} (compute capability {built_cc}), and this GPU is "
                          f"{device_name} (compute capability {capability}); engines are specific to the GPU: {rebuild}")
    if built_name != device_name:
        import warnings

        warnings.warn(f"the engine was built on {built_name} and runs on {device_name} (same compute capability); "
                      f"it works, but its kernels were tuned for the other GPU: {rebuild} for best speed", stacklevel=3)


def find_profile(profiles: list[dict[str, Any]], batch: int, seq: int, past: int) -> int:
    """The index of the first profile whose ranges hold this step, or a :class:`MoetrtError` naming the axis."""
    step = {"batch": batch, "seq": seq, "past": past, "total": past + seq}
    for index, profile in enumerate(profiles):
        axes = profile["axes"]
        if all(axes[a][0] <= step[a] <= axes[a][2] for a in AXES if a in axes):
            return index
    details = []
    for profile in profiles:
        axes = profile["axes"]
        bad = [f"{a} {step[a]} not in {axes[a][0]}..{axes[a][2]}" for a in AXES if a in axes
               and not axes[a][0] <= step[a] <= axes[a][2]]
        details.append(", ".join(bad))
    need = {a: step[a] for a in ("batch", "seq", "past")}
    wider = ",".join(f"{a}={min(profiles[0]['axes'][a][0], v)}:{profiles[0]['axes'][a][1]}:"
                     f"{max(profiles[0]['axes'][a][2], v)}" for a, v in need.items())
    raise MoetrtError(
        f"this step (batch {batch}, {seq} new tokens, {past} cached) is outside the engine's optimization "
        f"profile{'s' if len(profiles) > 1 else ''} ({'; '.join(details)}); use a smaller batch or shorter "
        f"prompts/generations, or rebuild the engine with a wider profile, e.g. --profile {wider}"
    )


# --- tensorrt ------------------------------------------------------------------------------------
def _parse_device(device: str) -> int:
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise MoetrtError(f"device {device!r}: the trt back end runs on NVIDIA GPUs; use 'cuda' or 'cuda:N'")
    return int(index or 0)


def _require_cuda_torch(index: int):
    import torch

    if not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "without CUDA"
        raise MoetrtError(f"the trt back end keeps its buffers in torch CUDA tensors, and torch {torch.__version__} "
                          f"(built {built}) sees no GPU; install a CUDA build of torch on a machine with an NVIDIA GPU")
    if index >= torch.cuda.device_count():
        raise MoetrtError(f"device cuda:{index} does not exist: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return torch


def _torch_dtype(trt, dtype):
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int64: torch.int64,
             trt.bool: torch.bool, trt.int8: torch.int8}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if dtype not in table:
        raise MoetrtError(f"the engine has a tensor of type {dtype}, which moetrt does not bind; rebuild the engine")
    return table[dtype]


def check_rtx_engine(info: EngineFolder, trt, index: int):
    """Refuse, with the reason, a TensorRT for RTX engine this machine cannot run: no GPU, a GPU whose compute
    capability the engine was not built for, or one the library itself calls invalid (``get_engine_validity``).
    Returns torch (with CUDA) when the engine may be deserialized."""
    import torch

    built_for = info.meta["engine"].get("compute_capabilities") or []
    source = (info.meta.get("onnx_source") or {}).get("folder") or "EXPORTED_DIR"
    what = f"{info.engine_path} was built by TensorRT for RTX for GPUs of compute capability {', '.join(built_for)}"
    if not torch.cuda.is_available():
        raise MoetrtError(f"{what}, and torch sees no NVIDIA GPU here; run it on such a GPU (an RTX or Ampere-or-newer "
                          "card), or build for this machine's back ends: moetrt optimize --target ort-cpu")
    torch = _require_cuda_torch(index)
    major, minor = torch.cuda.get_device_capability(index)
    if f"{major}.{minor}" not in built_for:
        raise MoetrtError(f"{what}, and this GPU is {torch.cuda.get_device_name(index)} (compute capability "
                          f"{major}.{minor}); rebuild it with --compute-capability {major}.{minor} if TensorRT for RTX "
                          f"targets it (moetrt optimize {source} --target {RTX_TARGET}), or use --target trt")
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    with open(info.engine_path, "rb") as f:
        header = f.read(runtime.engine_header_size)
    validity, diagnostics = runtime.get_engine_validity(header)
    if validity == trt.EngineValidity.INVALID:
        raise MoetrtError(f"{what}; TensorRT for RTX {trt.__version__} says it cannot run here (diagnostics "
                          f"{diagnostics}): rebuild it (moetrt optimize {source} --target {RTX_TARGET})")
    return torch


def load_engine(folder: str | os.PathLike, device: str = "cuda") -> tuple[Any, EngineFolder]:
    """Deserialize an engine folder's engine after checking it against this machine.

    Returns ``(tensorrt.ICudaEngine, EngineFolder)``; Polygraphy's ``TrtRunner(engine)`` runs it
    as well as :class:`TrtBackend` does. Registers the moetrt plugins first when the engine
    uses the Python (JIT) ones.
    """
    index = _parse_device(device)
    info = read_engine_folder(folder)
    if info.rtx:
        trt = import_tensorrt_rtx("running a TensorRT for RTX engine")
        check_engine_compatible(info.meta, str(trt.__version__), None, None)
        torch = check_rtx_engine(info, trt, index)
    else:
        trt = import_tensorrt("the trt back end")
        torch = _require_cuda_torch(index)
        major, minor = torch.cuda.get_device_capability(index)
        check_engine_compatible(info.meta, str(trt.__version__), torch.cuda.get_device_name(index), f"{major}.{minor}")
    if info.plugins == "jit":
        from moetrt.ops.plugins import register_plugins

        register_plugins()
    logger = trt.Logger(trt.Logger.WARNING)
    with torch.cuda.device(index):
        info.runtime = trt.Runtime(logger)
        engine = info.runtime.deserialize_cuda_engine(info.engine_path.read_bytes())
    if engine is None:
        why = ("its moetrt plugins run in Python (built with plugins='jit'): they must be registered, which needs "
               "moetrt, torch and triton here (moetrt.ops.plugins.register_plugins()); or rebuild with plugins='aot'"
               if info.plugins == "jit" else "the file is damaged or was not written by this TensorRT")
        raise MoetrtError(f"TensorRT {trt.__version__} could not load {info.engine_path} ({why}); TensorRT's log above "
                          "says more; rebuild the engine if in doubt")
    return engine, info


class TrtBackend:
    """Runs an engine folder; KV cache as torch CUDA tensors on ``device``."""

    name = "trt"

    def __init__(self, folder: str | os.PathLike, device: str = "cuda"):
        engine, info = load_engine(folder, device)
        import torch

        trt = import_tensorrt_rtx() if info.rtx else import_tensorrt()

        self._trt, self._torch = trt, torch
        self.engine, self.info = engine, info
        self.config = info.config
        index = _parse_device(device)
        self.device = f"cuda:{index}"
        self._device = torch.device("cuda", index)
        self.spec = ModelSpec.from_config(info.config, KV_DTYPES[info.dtype], router_outputs=info.router_outputs,
                                          state=info.state)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        wanted_outputs = [n for n in self.spec.output_names if not n.startswith("router_")]
        missing = [n for n in self.spec.input_names if n not in self._inputs]
        missing += [n for n in wanted_outputs if n not in self._outputs]
        if missing:
            raise CheckpointError(f"{info.engine_path} lacks the inputs/outputs moetrt expects ({', '.join(missing[:6])}); "
                                  "it was not built by moetrt from this model: rebuild the engine")
        self._dtypes = {n: _torch_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        with torch.cuda.device(index):
            self.context = engine.create_execution_context()
            self._stream = torch.cuda.Stream(self._device)
            self._placeholder = torch.empty(64, dtype=torch.uint8, device=self._device)  # address of empty tensors
        if self.context is None:
            raise MoetrtError("TensorRT could not create an execution context (out of GPU memory?)")
        self._profile = 0

    def check_lengths(self, batch: int, prompt_length: int, max_new_tokens: int) -> None:
        """Fail now, not halfway through, when a generation's steps leave the engine's profiles.

        The prefill is ``(batch, prompt_length, past 0)``; decode step ``i`` is ``(batch, 1, past
        prompt_length + i - 1)``. (The generate loop may call this before its first step.)
        """
        try:
            find_profile(self.info.profiles, batch, prompt_length, 0)
            for past in range(prompt_length, prompt_length + max_new_tokens - 1):
                find_profile(self.info.profiles, batch, 1, past)
        except MoetrtError as exc:
            raise MoetrtError(f"generating {max_new_tokens} tokens for {batch} prompt(s) of up to {prompt_length} "
                              f"tokens would leave the engine's profiles: {exc}") from None

    def _on_stream(self) -> contextlib.ExitStack:
        """Torch's current device and stream set to this back end's for one step."""
        stack = contextlib.ExitStack()
        stack.enter_context(self._torch.cuda.device(self._device))
        stack.enter_context(self._torch.cuda.stream(self._stream))
        return stack

    def _stream_handle(self) -> int:
        return self._stream.cuda_stream

    # --- Backend ---------------------------------------------------------------------------------
    def empty_past(self, batch: int) -> Feeds:
        return {name: self._torch.empty(shape, dtype=torch_dtype(self.spec.state_element_dtype(name)),
                                        device=self._device)  # [B, G, 0, Hd] for key/value
                for name, shape in self.spec.state.empty_past(batch).items()}

    def _device_tensor(self, name: str, value: Any):
        torch = self._torch
        dtype = self._dtypes[name]
        if isinstance(value, torch.Tensor):
            tensor = value
        else:
            array = np.asarray(value)
            if array.dtype.name == "bfloat16":  # ml_dtypes' bfloat16 (Polygraphy, parity feeds)
                tensor = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
            else:
                tensor = torch.from_numpy(np.ascontiguousarray(array))
        if tensor.device != self._device or tensor.dtype != dtype:
            tensor = tensor.to(device=self._device, dtype=dtype, non_blocking=True)
        return tensor.contiguous()

    def forward(self, feeds: Feeds, want_router: bool = False) -> Feeds:
        if want_router and not self.spec.router_outputs:
            raise MoetrtError(
                f"{self.info.folder} was built from an export without router outputs, so expert statistics cannot be "
                "collected from it; re-export with router outputs (moetrt export --router-outputs), rebuild the "
                "engine, or use the torch back end"
            )
        torch, context = self._torch, self.context
        batch, seq = np.shape(feeds["input_ids"])
        past = self.spec.state.past_length({n: np.shape(feeds[n]) for n in self.spec.state.all_past_names() if n in feeds})
        profile = find_profile(self.info.profiles, int(batch), int(seq), past)
        outputs: Feeds = {}
        with self._on_stream():
            stream = self._stream_handle()
            if profile != self._profile:
                context.set_optimization_profile_async(profile, stream)
                self._profile = profile
            bound = {}  # keeps every input alive until the step is done
            for name in self._inputs:
                if name not in feeds:
                    raise MoetrtError(f"the engine needs input {name!r}, which the feeds lack")
                tensor = self._device_tensor(name, feeds[name])
                bound[name] = tensor
                if not context.set_input_shape(name, tuple(tensor.shape)):
                    raise MoetrtError(f"TensorRT refused shape {tuple(tensor.shape)} for input {name} (outside the "
                                      "engine's profile?); rebuild the engine with a wider --profile")
                context.set_tensor_address(name, tensor.data_ptr() if tensor.numel() else self._placeholder.data_ptr())
            unresolved = context.infer_shapes()
            if unresolved:
                raise MoetrtError(f"TensorRT could not infer the shapes of {unresolved}; rebuild the engine")
            device_out = {}
            for name in self._outputs:
                shape = tuple(context.get_tensor_shape(name))
                tensor = torch.empty(shape, dtype=self._dtypes[name], device=self._device)
                device_out[name] = tensor
                context.set_tensor_address(name, tensor.data_ptr() if tensor.numel() else self._placeholder.data_ptr())
            if not context.execute_async_v3(stream):
                raise MoetrtError("TensorRT failed to run the engine; its log above says why")
            outputs["logits"] = device_out["logits"].float().cpu().numpy()  # [B, S, V]; waits for the stream
            for name in self.spec.state.all_present_names():
                outputs[name] = device_out[name]  # [B, G, P+S, Hd] for key/value, stays on the GPU
            if want_router:
                for layer in self.spec.moe_layers:
                    w_name, i_name = router_names(layer)
                    outputs[w_name] = device_out[w_name].float().cpu().numpy()  # [B*S, K]
                    outputs[i_name] = device_out[i_name].to(torch.int32).cpu().numpy()  # [B*S, K]
            del bound
        return outputs
