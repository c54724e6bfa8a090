"""The TensorRT back end: a serialized engine behind the same :class:`Backend` interface.

Not built yet (it arrives with the TensorRT issue, after ``moetrt optimize --target trt``
writes engines). The shape it will take, so the interface is known to fit:

- ``__init__(folder, device="cuda")``: deserialize ``model.engine`` with
  ``tensorrt.Runtime(...).deserialize_cuda_engine``, create one execution context, read the
  I/O tensor names (the same names as the ONNX graph) and the ``moetrt.json`` config into a
  :class:`ModelSpec`;
- ``empty_past(batch)``: device buffers of shape ``[B, G, 0, Hd]``;
- ``forward(feeds)``: ``context.set_input_shape`` for every input, ``set_tensor_address`` for
  inputs and outputs (``present.*`` in device buffers sized ``P+S``, which become the next
  step's ``past_key_values.*``), ``execute_async_v3`` on a stream, copy ``logits`` (and router
  outputs) back to the host.
"""

from __future__ import annotations

import os

from moetrt.config import MoEConfig
from moetrt.errors import BackendMissingError
from moetrt.runtime.backend import Feeds, ModelSpec

__all__ = ["TrtBackend"]


class TrtBackend:
    name = "trt"
    device: str
    config: MoEConfig
    spec: ModelSpec

    def __init__(self, folder: str | os.PathLike, device: str = "cuda"):
        try:
            import tensorrt  # noqa: F401
        except ImportError as exc:
            raise BackendMissingError(
                "the trt back end needs TensorRT, which is not installed: pip install tensorrt "
                "(NVIDIA GPU with CUDA required); use backend='ort' or backend='torch' meanwhile"
            ) from exc
        raise BackendMissingError(
            "the TensorRT back end is not available yet in this moetrt version; "
            "use backend='ort' (ONNX Runtime) or backend='torch' meanwhile"
        )

    def empty_past(self, batch: int) -> Feeds:  # pragma: no cover - see the module docstring
        raise NotImplementedError

    def forward(self, feeds: Feeds, want_router: bool = False) -> Feeds:  # pragma: no cover
        raise NotImplementedError
