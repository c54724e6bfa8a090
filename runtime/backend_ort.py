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
from moetrt.state import BATCH, PAST

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
        # what every step binds, worked out once: names, devices, element types, state entries
        C = ort.capi._pybind_state
        self._binding = C.SessionIOBinding(self.session._sess)
        self._host_device = ort.OrtDevice.make("cpu", 0)._get_c_device()
        self._device = ort.OrtDevice.make(device_type, device_id)._get_c_device()
        self._past_names = tuple(self.spec.state.all_past_names())
        self._present_names = tuple(self.spec.state.all_present_names())
        self._host = ("logits",)
        self._host_with_router = ("logits", *(n for layer in self.spec.moe_layers for n in router_names(layer)))
        self._host_bound: tuple[str, ...] | None = None  # the host outputs the binding holds now
        self._sizes = self.spec.state.size_map
        # each distinct present shape with its batch and position axes left as BATCH / PAST, and per present
        # output (name, index of its shape, element type, the two buffer addresses: _reserve_kv fills them)
        entries = list(dict.fromkeys(self.spec.state.entry_of(name)[1] for name in self._present_names))
        self._present_dims = [entry.symbolic_shape(self._sizes, BATCH, PAST) for entry in entries]
        self._kv_pointers: dict[str, list[int]] = {name: [0, 0] for name in self._present_names}
        self._present_bindings = tuple(
            (name, entries.index(self.spec.state.entry_of(name)[1]),
             onnx_elem_type(self.spec.state_element_dtype(name)), self._kv_pointers[name])
            for name in self._present_names
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
        # one binding for the life of the back end, rebound in place (a name bound again replaces the old
        # binding), through ORT's own binding object: its Python wrapper costs ~10 us per bind on top.
        # Everything a step does not have to work out again was worked out in __init__; on a small model
        # this Python is a tenth of a decode step (benchmarks/bench_runtime_overhead.py).
        binding = self._binding
        held = []  # host arrays bound by address: they must outlive the run
        for name in ("input_ids", "attention_mask", "position_ids"):
            value = feeds[name]
            if type(value) is not np.ndarray or value.dtype != np.int64 or not value.flags.c_contiguous:
                value = np.ascontiguousarray(value, dtype=np.int64)
            binding.bind_input(name, value)
            held.append(value)
        ortvalue = self._ort.OrtValue
        past_ptr = None
        for name in self._past_names:
            value = feeds[name]
            if isinstance(value, ortvalue):
                binding.bind_ortvalue_input(name, value._ortvalue)  # the previous step's present, already on the device
                if past_ptr is None:
                    past_ptr = value.data_ptr()
            else:
                value = np.ascontiguousarray(value)
                binding.bind_input(name, value)  # a host array (NumPy; bfloat16 through ml_dtypes)
                held.append(value)

        host = self._host_with_router if want_router else self._host
        if host is not self._host_bound:  # a name bound again replaces its binding: clear only to drop router outputs
            binding.clear_binding_outputs()
            self._host_bound = host
        for name in host:  # (again every step: a run leaves the output it allocated bound, at that step's shape)
            binding.bind_output(name, self._host_device)
        batch, total = held[0].shape[0], held[1].shape[1]  # P + S positions in each present
        retired = (self._reserve_kv(batch, total)  # the buffers a growth replaced stay alive for this run
                   if batch != self._kv_batch or total > self._kv_positions else None)
        present_names = self._present_names
        slot = 1 if present_names and self._kv_pointers[present_names[0]][0] == past_ptr else 0  # never write over the past
        shapes = [[batch if d is BATCH else total if d is PAST else d for d in dims] for dims in self._present_dims]
        device = self._device
        for name, shape, elem_type, pointers in self._present_bindings:
            # [B, G, P+S, Hd] for key/value, written into this step's buffer of the pair
            binding.bind_output(name, device, elem_type, shapes[shape], pointers[slot])

        self.session._sess.run_with_iobinding(binding, None)
        del retired, held
        values = binding.get_outputs()  # in binding order: host outputs, then the presents
        outputs: Feeds = {name: values[i].numpy() for i, name in enumerate(host)}
        for i, name in enumerate(present_names, len(host)):
            outputs[name] = ortvalue(values[i])
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
        for name, pair in self._kv_buffers.items():  # in place: _present_bindings holds these lists
            self._kv_pointers[name][:] = [buffer.data_ptr() for buffer in pair]
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

