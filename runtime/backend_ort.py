"""The ONNX Runtime back end: an exported folder's ``model.onnx`` on the CPU or CUDA execution provider.

Every step goes through ORT's IO binding (``InferenceSession.io_binding``,
``run_with_iobinding``): ``present.*`` outputs are written into buffers on the session's
device, and the returned ``OrtValue``s are bound as the next step's ``past_key_values.*``, so
on CUDA the KV cache never crosses PCIe. ``logits`` and router outputs are bound to the host,
where sampling happens. The CPU provider takes the same path with device ``"cpu"``.

The back end owns two buffers per ``present`` output and writes them in turn (step t reads its
past from one and writes its present into the other), grown by doubling: a long generation
allocates a handful of times instead of every step, so memory stays flat instead of filling
ONNX Runtime's arena with freed caches one position too short. A ``present`` value is therefore
valid until the second ``forward`` after the one that returned it, which is all the generate
loop needs.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from moetrt.errors import BackendMissingError, CheckpointError, MoetrtError
from moetrt.dtypes import itemsize, onnx_elem_type
from moetrt.runtime.backend import KV_DTYPES, Feeds, ModelSpec, numpy_empty_past, router_names
from moetrt.runtime.model_folder import read_exported

__all__ = ["OrtBackend", "import_onnxruntime"]

KV_POSITION_STEP = 256  # present buffers hold a multiple of this many positions


def import_onnxruntime(device_type: str = "cpu") -> Any:
    """``import onnxruntime``, or a :class:`BackendMissingError` naming the package to install."""
    package = "onnxruntime-gpu" if device_type == "cuda" else "onnxruntime"
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendMissingError(
            f"the ort back end needs ONNX Runtime, which is not installed: pip install {package}"
        ) from exc
    return onnxruntime


def _parse_device(device: str) -> tuple[str, int]:
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise MoetrtError(f"device {device!r} is not supported by the ort back end; use 'cpu', 'cuda' or 'cuda:N'")
    return kind, int(index or 0)


class OrtBackend:
    """Runs an exported folder with ``onnxruntime.InferenceSession``; KV cache as ``OrtValue``s on ``device``."""

    name = "ort"

    def __init__(
        self,
        folder: str | os.PathLike,
        device: str = "cpu",
        session_options: Any = None,
        provider_options: dict[str, Any] | None = None,
    ):
        device_type, device_id = _parse_device(device)
        exported = read_exported(folder)
        ort = import_onnxruntime(device_type)
        if device_type == "cuda":
            available = ort.get_available_providers()
            if "CUDAExecutionProvider" not in available:
                raise BackendMissingError(
                    f"device {device!r} needs ONNX Runtime's CUDA execution provider, which the installed "
                    f"onnxruntime {ort.__version__} lacks (it has {', '.join(available)}): "
                    "pip uninstall onnxruntime && pip install onnxruntime-gpu"
                )
            providers: list[Any] = [
                ("CUDAExecutionProvider", {"device_id": device_id, **(provider_options or {})}),
                "CPUExecutionProvider",
            ]
        else:
            providers = ["CPUExecutionProvider"]
        if session_options is None:
            session_options = ort.SessionOptions()
            # fatal only: node placement notes are not news to the user, and ORT's errors come back as
            # exceptions that we turn into one-line messages (its log would print them twice, in colour)
            session_options.log_severity_level = 4
        try:
            self.session = ort.InferenceSession(str(exported.onnx_path), sess_options=session_options, providers=providers)
        except Exception as exc:  # ORT raises its own pybind error types (Fail, InvalidGraph, NoSuchFile, ...)
            exported.verify_checksums()  # a truncated or changed file: say that rather than ORT's parse error
            reason = " ".join(str(exc).split())  # ORT's messages span lines; the CLI prints one
            raise CheckpointError(
                f"ONNX Runtime {ort.__version__} cannot load {exported.onnx_path}: {reason}; re-export the model, "
                "or update onnxruntime if the export used a newer opset"
            ) from exc
        if device_type == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            message = (f"device {device!r} is not available: ONNX Runtime could not start its CUDA execution provider "
                       "(no NVIDIA GPU, or the CUDA/cuDNN libraries onnxruntime-gpu needs are missing); ")
            raise MoetrtError(message + "use device='cpu'", cli=message + "use --device cpu")
        self._ort = ort
        self._kv_buffers: dict[str, list[Any]] = {}  # present name -> two flat OrtValues, written in turn
        self._kv_positions = 0  # positions each buffer holds (at the current batch)
        self._kv_batch = 0
        self.exported = exported
        self.config = exported.config
        self.device = f"cuda:{device_id}" if device_type == "cuda" else "cpu"
        self._device_type, self._device_id = device_type, device_id

        graph_inputs = {i.name for i in self.session.get_inputs()}
        graph_outputs = {o.name for o in self.session.get_outputs()}
        router = all(
            name in graph_outputs for layer in exported.config.moe_layers for name in router_names(layer)
        )
        self.spec = ModelSpec.from_config(exported.config, KV_DTYPES[exported.dtype], router_outputs=router,
                                          state=exported.state)
        wanted_outputs = [n for n in self.spec.output_names if not n.startswith("router_")]
        missing = [n for n in self.spec.input_names if n not in graph_inputs]
        missing += [n for n in wanted_outputs if n not in graph_outputs]
        if missing:
            raise CheckpointError(
                f"{exported.onnx_path} lacks the graph inputs/outputs moetrt expects ({', '.join(missing[:6])}); "
                "it was not written by `moetrt export` or comes from another version: re-export it"
            )

    def empty_past(self, batch: int) -> Feeds:
        zeros = numpy_empty_past(self.spec, batch)  # fixed-size state (a linear-attention layer's) starts at zero
        return {
            name: self._ort.OrtValue.ortvalue_from_numpy(zeros[name], self._device_type, self._device_id) if np.prod(shape)
            else self._ort.OrtValue.ortvalue_from_shape_and_type(
                list(shape), onnx_elem_type(self.spec.state_element_dtype(name)), self._device_type, self._device_id
            )  # [B, G, 0, Hd] for key/value
            for name, shape in self.spec.state.empty_past(batch).items()
        }

    def forward(self, feeds: Feeds, want_router: bool = False) -> Feeds:
        if want_router and not self.spec.router_outputs:
            raise MoetrtError(
                f"{self.exported.folder} was exported without router outputs, so expert statistics cannot be "
                "collected from it; re-export with router outputs (moetrt export --router-outputs) or use the "
                "torch back end"
            )
        binding = self.session.io_binding()
        for name in ("input_ids", "attention_mask", "position_ids"):
            binding.bind_cpu_input(name, np.ascontiguousarray(feeds[name], dtype=np.int64))
        for name in self.spec.state.all_past_names():
            value = feeds[name]
            if isinstance(value, self._ort.OrtValue):
                binding.bind_ortvalue_input(name, value)  # the previous step's present, already on the device
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))

        host = ["logits"]
        if want_router:
            for layer in self.spec.moe_layers:
                host += router_names(layer)
        device = self.spec.state.all_present_names()
        for name in host:
            binding.bind_output(name, "cpu")
        batch, seq = np.shape(feeds["input_ids"])
        total = np.shape(feeds["attention_mask"])[1]  # P + S positions in each present
        retired = self._reserve_kv(batch, total)  # the buffers a growth replaced stay alive for this run
        past_ptr = _data_ptr(feeds[self.spec.state.all_past_names()[0]]) if device else None
        slot = 1 if device and self._kv_buffers[device[0]][0].data_ptr() == past_ptr else 0  # never write over the past
        for name in device:
            buffer = self._kv_buffers[name][slot]
            shape = list(self.spec.state_shape(name, batch, total))  # [B, G, P+S, Hd] for key/value
            elem_type = onnx_elem_type(self.spec.state_element_dtype(name))
            binding.bind_output(name, self._device_type, self._device_id, elem_type, shape, buffer.data_ptr())

        self.session.run_with_iobinding(binding)
        del retired
        values = binding.get_outputs()  # in binding order
        outputs: Feeds = {}
        for name, value in zip(host + device, values, strict=True):
            outputs[name] = value.numpy() if name in host else value
        return outputs

    def _reserve_kv(self, batch: int, positions: int) -> list[Any]:
        """Make every present buffer hold ``positions`` at ``batch``; returns the buffers it replaced."""
        if batch == self._kv_batch and positions <= self._kv_positions:
            return []
        grow = 2 * self._kv_positions if batch == self._kv_batch else 0
        capacity = max(positions, grow)
        capacity = -(-capacity // KV_POSITION_STEP) * KV_POSITION_STEP
        retired = [buffer for pair in self._kv_buffers.values() for buffer in pair]
        self._kv_buffers = {
            name: [
                self._ort.OrtValue.ortvalue_from_shape_and_type(
                    [int(np.prod(self.spec.state_shape(name, batch, capacity)))],
                    onnx_elem_type(self.spec.state_element_dtype(name)), self._device_type, self._device_id,
                )
                for _ in range(2)
            ]
            for name in self.spec.state.all_present_names()
        }  # fmt: skip
        self._kv_batch, self._kv_positions = batch, capacity
        return retired

    @property
    def kv_buffer_bytes(self) -> int:
        """Bytes the present buffers hold now (two per present output)."""
        return 2 * sum(
            int(np.prod(self.spec.state_shape(name, self._kv_batch, self._kv_positions)))
            * itemsize(self.spec.state_element_dtype(name))
            for name in self._kv_buffers
        )


def _data_ptr(value: Any) -> int | None:
    return value.data_ptr() if hasattr(value, "data_ptr") and not isinstance(value, np.ndarray) else None
