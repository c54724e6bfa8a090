"""The torch back end: the reference :class:`moetrt.MoETransformer` behind the :class:`Backend` interface.

It runs from a model object, a preset name, a Hugging Face checkpoint folder, or an exported
folder whose ``moetrt.json`` names a source (checkpoint folder or preset) that exists here.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moetrt.checkpoint import from_pretrained
from moetrt.errors import CheckpointError, MoetrtError
from moetrt.model import MoETransformer
from moetrt.runtime.backend import Feeds, ModelSpec, past_names, present_names, router_names

__all__ = ["TorchBackend", "torch_device", "TORCH_DTYPES"]

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_KV_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def torch_device(device: str) -> torch.device:
    """``"cpu"`` | ``"cuda"`` | ``"cuda:N"`` -> a torch device that exists here, or a clear error."""
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise MoetrtError(f"device {device!r} is not a device name; use 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise MoetrtError(f"device {device!r} is not supported by the torch back end; use 'cpu' or 'cuda'")
    if not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "without CUDA"
        raise MoetrtError(
            f"device {device!r} is not available: torch {torch.__version__} (built {built}) sees no CUDA GPU; "
            "use device='cpu', or install a CUDA build of torch on a machine with an NVIDIA GPU"
        )
    index = dev.index or 0
    if index >= torch.cuda.device_count():
        raise MoetrtError(f"device {device!r} does not exist: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in TORCH_DTYPES:
        raise MoetrtError(f"dtype {dtype!r} is not one of {tuple(TORCH_DTYPES)}")
    return TORCH_DTYPES[dtype]


def _resolve_export_source(exported: Any) -> str:
    """The checkpoint folder or preset an exported folder came from, if it exists here."""
    from moetrt.config import PRESETS

    source = exported.source
    if source:
        candidates = [Path(source)]
        if not Path(source).is_absolute():
            candidates.append(exported.folder / source)
        for path in candidates:
            if path.is_dir():
                return str(path)
        if source in PRESETS:
            return source
    raise CheckpointError(
        f"the torch back end runs the PyTorch model, but {exported.folder} was exported from "
        f"{source!r}, which is not found here; pass that checkpoint folder or preset instead "
        "(Session('<checkpoint folder>', backend='torch')), or run the export with backend='ort'"
    )


class TorchBackend:
    """Runs a :class:`MoETransformer` step by step; the KV cache stays a list of torch tensors on ``device``."""

    name = "torch"

    def __init__(self, model: MoETransformer, device: str = "cpu"):
        if not isinstance(model, MoETransformer):
            raise TypeError(f"TorchBackend wraps a moetrt.MoETransformer, got {type(model).__name__}")
        dev = torch_device(device)
        if dev.type == "cuda":  # the MoE ops run as the Triton kernels on NVIDIA GPUs
            from moetrt.ops.kernels import maybe_register_cuda_kernels

            maybe_register_cuda_kernels()
        self.model = model.to(dev).eval()
        self.device = str(dev)
        self.config = model.config
        self._device = dev
        kv_dtype = _KV_DTYPE_NAMES[model.dtype]
        self.spec = ModelSpec.from_config(model.config, kv_dtype, router_outputs=True)

    @classmethod
    def load(
        cls, source: str | os.PathLike | Any, device: str = "cpu", dtype: str | torch.dtype | None = None
    ) -> TorchBackend:
        """From a model object, a transformers model, a preset name, a checkpoint folder or an exported folder."""
        from moetrt.runtime.model_folder import read_exported, source_kind

        torch_dtype = _torch_dtype(dtype)
        if isinstance(source, MoETransformer):
            model = source if torch_dtype is None else source.to(torch_dtype)
            return cls(model, device)
        if not isinstance(source, (str, os.PathLike)):
            return cls(from_pretrained(source, dtype=torch_dtype), device)  # a transformers model
        if source_kind(source) == "exported":
            exported = read_exported(source)
            origin = _resolve_export_source(exported)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a random preset says so; the config check below covers it
                model = from_pretrained(origin, dtype=torch_dtype or TORCH_DTYPES[exported.dtype])
            if model.config != exported.config:
                raise CheckpointError(
                    f"{exported.folder} was exported from {origin!r}, whose config now differs from the one "
                    "recorded in moetrt.json; the checkpoint changed after export: re-export it"
                )
            return cls(model, device)
        return cls(from_pretrained(source, dtype=torch_dtype), device)

    def empty_past(self, batch: int) -> Feeds:
        empty = torch.empty(self.spec.kv_shape(batch, 0), dtype=self.model.dtype, device=self._device)  # [B, G, 0, Hd]
        feeds: Feeds = {}
        for i in range(self.spec.num_layers):
            key, value = past_names(i)
            feeds[key], feeds[value] = empty, empty
        return feeds

    def _tensor(self, value: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
        tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
        return tensor.to(device=self._device, dtype=dtype)

    @torch.inference_mode()
    def forward(self, feeds: Feeds, want_router: bool = False) -> Feeds:
        input_ids = self._tensor(feeds["input_ids"], torch.int64)  # [B, S]
        attention_mask = self._tensor(feeds["attention_mask"], torch.int64)  # [B, P+S]
        position_ids = self._tensor(feeds["position_ids"], torch.int64)  # [B, S]
        past = []
        for i in range(self.spec.num_layers):
            key, value = past_names(i)
            past.append((self._tensor(feeds[key], self.model.dtype), self._tensor(feeds[value], self.model.dtype)))
        out = self.model(
            input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past, use_cache=True, output_router=want_router,
        )
        outputs: Feeds = {"logits": out.logits.float().cpu().numpy()}  # [B, S, V]
        for i, (k, v) in enumerate(out.past_key_values):
            key, value = present_names(i)
            outputs[key], outputs[value] = k, v  # [B, G, P+S, Hd], stay on the device
        if want_router:
            for layer, weights, indices in zip(self.spec.moe_layers, out.router_weights, out.router_indices, strict=True):
                w_name, i_name = router_names(layer)
                outputs[w_name] = weights.float().cpu().numpy()  # [B*S, K]
                outputs[i_name] = indices.to(torch.int32).cpu().numpy()  # [B*S, K]
        return outputs
