"""The torch back end: the reference :class:`moetrt.MoETransformer` behind the :class:`Backend` interface.

It runs from a model object, a preset name, a Hugging Face checkpoint folder, or an exported
folder whose ``moetrt.json`` names a source (checkpoint folder or preset) that exists here.

On CUDA the MoE ops run as the Triton kernels, the KV cache is a :class:`StaticKVCache`
(buffers allocated once per batch and capacity, written in place) and each decode step replays
a CUDA graph captured once per (batch, capacity): a step costs one graph launch instead of
hundreds of kernel launches from Python. ``present.*`` outputs are then views of the cache
buffers, valid until the next prefill on this back end (the generate loop feeds them straight
back, which is all it needs). ``static_cache`` / ``cuda_graphs`` turn either off (both default
to on for CUDA, off for the CPU, where ``static_cache=True`` runs the same path without graphs).
``compile_decode=True`` also runs the captured step through ``torch.compile`` (fewer, fused
kernels; it costs a compile of some seconds at the first decode step of each batch size).

``expert_precision="fp8"`` (CUDA, compute capability 8.9 or later) runs the routed experts as FP8
e4m3 grouped GEMMs (:class:`moetrt.fp8.FP8Experts`): ``fp8_weight_scales`` ``"block"`` (128 x 128,
or the checkpoint's ``weight_block_size``) or ``"channel"``, ``fp8_activation_scales`` ``"token"``
or ``"block"`` (per 128 columns). A checkpoint stored in block-scaled FP8 (DeepSeek-V3, Kimi-K2)
gives its expert bytes and scales to the GPU as stored; other weights are quantized on load.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moetrt.checkpoint import from_pretrained
from moetrt import dtypes
from moetrt.errors import CheckpointError, MoetrtError
from moetrt.model import MoETransformer, StaticKVCache
from moetrt.runtime.backend import Feeds, ModelSpec, router_names

__all__ = ["TorchBackend", "torch_device", "TORCH_DTYPES"]

TORCH_DTYPES = {d: dtypes.torch_dtype(d) for d in dtypes.DTYPES}
CAPACITY_STEP = 256  # static caches hold a multiple of this many positions: few distinct graphs


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
        message = f"device {device!r} is not available: torch {torch.__version__} (built {built}) sees no CUDA GPU; "
        fix = "{}, or install a CUDA build of torch on a machine with an NVIDIA GPU"
        raise MoetrtError(message + fix.format("use device='cpu'"), cli=message + fix.format("use --device cpu"))
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
    if source in PRESETS:  # recorded as the bare name: the preset, not a folder of that name
        return source
    if source:
        candidates = [Path(source)]
        if not Path(source).is_absolute():
            candidates.append(exported.folder / source)
        for path in candidates:
            if path.is_dir():
                return str(path)
        if source in PRESETS:
            return source
    message = (f"the torch back end runs the PyTorch model, but {exported.folder} was exported from "
               f"{source!r}, which is not found here; pass that checkpoint folder or preset instead")
    raise CheckpointError(
        message + " (Session('<checkpoint folder>', backend='torch')), or run the export with backend='ort'",
        cli=message + f", or run the export with --backend ort (moetrt generate {exported.folder} --backend ort)",
    )


def _check_expert_precision(precision: str, weight_scales: str, activation_scales: str, device: torch.device) -> bool:
    """Whether the experts run in FP8; a one-line error for a bad option or a device that cannot."""
    from moetrt.fp8 import ACTIVATION_SCALES, EXPERT_PRECISIONS, WEIGHT_SCALES, check_fp8_device

    if precision not in EXPERT_PRECISIONS:
        raise MoetrtError(f"expert_precision {precision!r} is not one of {EXPERT_PRECISIONS}")
    if weight_scales not in WEIGHT_SCALES:
        raise MoetrtError(f"fp8_weight_scales {weight_scales!r} is not one of {WEIGHT_SCALES}")
    if activation_scales not in ACTIVATION_SCALES:
        raise MoetrtError(f"fp8_activation_scales {activation_scales!r} is not one of {ACTIVATION_SCALES}")
    if precision == "fp8":
        check_fp8_device(device)
    return precision == "fp8"


class TorchBackend:
    """Runs a :class:`MoETransformer` step by step; the KV cache stays a list of torch tensors on ``device``."""

    name = "torch"

    def __init__(
        self,
        model: MoETransformer,
        device: str = "cpu",
        *,
        static_cache: bool | None = None,
        cuda_graphs: bool | None = None,
        compile_decode: bool = False,
        expert_precision: str = "model",
        fp8_weight_scales: str = "block",
        fp8_activation_scales: str = "token",
    ):
        if not isinstance(model, MoETransformer):
            raise TypeError(f"TorchBackend wraps a moetrt.MoETransformer, got {type(model).__name__}")
        dev = torch_device(device)
        on_cuda = dev.type == "cuda"
        fp8 = _check_expert_precision(expert_precision, fp8_weight_scales, fp8_activation_scales, dev)
        if on_cuda:  # the MoE ops run as the Triton kernels on NVIDIA GPUs
            from moetrt.ops.kernels import maybe_register_cuda_kernels

            maybe_register_cuda_kernels()
        self.expert_precision = expert_precision
        self.fp8_layers: dict[str, int] | None = None  # MoE layers whose experts came from FP8 bytes / were quantized
        if fp8:
            from moetrt.fp8 import fp8_experts

            try:
                self.fp8_layers = fp8_experts(model, fp8_weight_scales, fp8_activation_scales,
                                              checkpoint=getattr(model, "source_dir", None))
            except ValueError as exc:  # a block size the kernels cannot run
                raise MoetrtError(f"expert_precision='fp8': {exc}") from exc
        self.static_cache = (on_cuda or bool(cuda_graphs)) if static_cache is None else bool(static_cache)
        self.cuda_graphs = (on_cuda and self.static_cache) if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and not self.static_cache:
            raise MoetrtError("cuda_graphs=True needs static_cache=True: a graph replays fixed KV-cache buffers")
        if self.cuda_graphs and not on_cuda:
            raise MoetrtError(f"cuda_graphs=True needs device='cuda', got device={device!r}")
        if compile_decode and not self.cuda_graphs:
            raise MoetrtError("compile_decode=True compiles the captured decode step: it needs cuda_graphs=True")
        self.compile_decode = bool(compile_decode)
        self.model = model.to(dev).eval()
        self.device = str(dev)
        self.config = model.config
        self._device = dev
        kv_dtype = dtypes.element_name(dtypes.from_torch(model.dtype))
        self.spec = ModelSpec.from_config(model.config, kv_dtype, router_outputs=True)
        self._cache: StaticKVCache | None = None
        self._handed_out: torch.Tensor | None = None  # present.0.key of the last step: a view of self._cache
        self._graphs: dict[int, _DecodeGraph] = {}  # per batch size, for the current cache
        self._graph_pool = None

    @classmethod
    def load(
        cls,
        source: str | os.PathLike | Any,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        **options: Any,
    ) -> TorchBackend:
        """From a model object, a transformers model, a preset name, a checkpoint folder or an exported folder.

        ``options`` go to the constructor (``static_cache``, ``cuda_graphs``, ``expert_precision``, ...).
        """
        from moetrt.runtime.model_folder import read_exported, source_kind

        torch_dtype = _torch_dtype(dtype)
        _check_expert_precision(options.get("expert_precision", "model"), options.get("fp8_weight_scales", "block"),
                                options.get("fp8_activation_scales", "token"), torch_device(device))  # before loading
        if isinstance(source, MoETransformer):
            model = source if torch_dtype is None else source.to(torch_dtype)
            return cls(model, device, **options)
        if not isinstance(source, (str, os.PathLike)):
            return cls(from_pretrained(source, dtype=torch_dtype), device, **options)  # a transformers model
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
            return cls(model, device, **options)
        return cls(from_pretrained(source, dtype=torch_dtype), device, **options)

    def empty_past(self, batch: int) -> Feeds:
        # [B, G, 0, Hd] for key/value; fixed-size state (a linear-attention layer's) starts at zero
        return {name: torch.zeros(shape, dtype=dtypes.torch_dtype(self.spec.state_element_dtype(name)), device=self._device)
                for name, shape in self.spec.state.empty_past(batch).items()}

    def _tensor(self, value: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
        tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
        return tensor.to(device=self._device, dtype=dtype)

    @torch.inference_mode()
    def forward(self, feeds: Feeds, want_router: bool = False) -> Feeds:
        input_ids = self._tensor(feeds["input_ids"], torch.int64)  # [B, S]
        attention_mask = self._tensor(feeds["attention_mask"], torch.int64)  # [B, P+S]
        position_ids = self._tensor(feeds["position_ids"], torch.int64)  # [B, S]
        if self.static_cache:
            return self._forward_static(feeds, input_ids, attention_mask, position_ids, want_router)
        past = [self._layer_past(feeds, i) for i in range(self.spec.num_layers)]
        out = self.model(
            input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past, use_cache=True, output_router=want_router,
        )  # fmt: skip
        return self._outputs(out.logits, out.past_key_values, out if want_router else None)

    def _layer_past(self, feeds: Feeds, layer: int) -> tuple[torch.Tensor, ...]:
        """Layer ``layer``'s state from ``feeds``, in its entries' order, on the device in its dtype."""
        return tuple(self._tensor(feeds[name], dtypes.torch_dtype(self.spec.state_element_dtype(name)))
                     for name in self.spec.state.past_names(layer))

    def _outputs(self, logits: torch.Tensor, presents, router_out) -> Feeds:
        outputs: Feeds = {"logits": logits.float().cpu().numpy()}  # [B, S, V]
        for i, tensors in enumerate(presents):
            for name, tensor in zip(self.spec.state.present_names(i), tensors, strict=True):
                outputs[name] = tensor  # [B, G, P+S, Hd] for key/value, stays on the device
        if router_out is not None:
            routers = zip(self.spec.moe_layers, router_out.router_weights, router_out.router_indices, strict=True)
            for layer, weights, indices in routers:
                w_name, i_name = router_names(layer)
                outputs[w_name] = weights.float().cpu().numpy()  # [B*S, K]
                outputs[i_name] = indices.to(torch.int32).cpu().numpy()  # [B*S, K]
        return outputs

    # --- static KV cache and CUDA graphs -----------------------------------------------------------
    def _forward_static(self, feeds, input_ids, attention_mask, position_ids, want_router) -> Feeds:
        batch, seq = input_ids.shape
        past = int(attention_mask.shape[1]) - seq
        total = past + seq
        cache = self._prepare_cache(feeds, batch, past, total)
        graph = None
        if self.cuda_graphs and seq == 1 and not want_router:
            graph = self._graphs.get(batch) or self._capture(batch, input_ids, attention_mask, position_ids, past)
            graph.run(input_ids, attention_mask, position_ids, past)
            logits, router_out = graph.logits, None  # [B, 1, V]
        else:
            mask = torch.zeros(batch, cache.capacity, dtype=torch.int64, device=self._device)  # [B, C]
            mask[:, :total] = attention_mask
            cache_position = torch.arange(past, total, device=self._device)  # [S]
            out = self.model(
                input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                output_router=want_router, static_cache=cache, cache_position=cache_position,
            )  # fmt: skip
            logits, router_out = out.logits, (out if want_router else None)
        presents = [self._written(cache, i, total) for i in range(self.spec.num_layers)]  # [B, G, P+S, Hd] for K/V
        outputs = self._outputs(logits, presents, router_out)
        self._handed_out = outputs[self.spec.state.all_present_names()[0]]
        return outputs

    def _prepare_cache(self, feeds: Feeds, batch: int, past: int, total: int) -> StaticKVCache:
        """The cache this step writes into: the current one when the past is what we handed out last step."""
        first = self.spec.state.all_past_names()[0]
        cache, key0 = self._cache, feeds[first]
        expected = self.spec.state_shape(first, batch, past)
        if tuple(key0.shape) != expected:
            dims = ", ".join(map(str, self.spec.state.entries(0)[0].dims))
            raise MoetrtError(f"{first} must be {list(expected)} ({dims}), got {list(key0.shape)}")
        ours = past > 0 and key0 is self._handed_out and cache is not None and cache.batch == batch
        if ours and total <= cache.capacity:
            return cache
        if cache is None or cache.batch != batch or cache.capacity < total or ours:
            if ours:  # grow: keep the written positions
                past_kv = [self._written(cache, i, past) for i in range(self.spec.num_layers)]
            capacity = max(total, 2 * cache.capacity if ours else 0)
            capacity = min(-(-capacity // CAPACITY_STEP) * CAPACITY_STEP, self.spec.max_positions)
            self._cache, self._graphs = None, {}  # free the old buffers (and the graphs that write them) first
            new = StaticKVCache(self.config, batch, max(capacity, total), self.model.dtype, self._device)
            if ours:
                new.load(past_kv)
            cache = self._cache = new
        if not ours and past > 0:  # a past that came from elsewhere: copy it in
            cache.load([self._layer_past(feeds, i) for i in range(self.spec.num_layers)])
        return cache

    def _written(self, cache: StaticKVCache, layer: int, positions: int) -> tuple[torch.Tensor, ...]:
        """Layer ``layer``'s buffers cut to the first ``positions`` (fixed-size state whole)."""
        return tuple(b.narrow(e.concat_axis, 0, positions) if e.grows else b
                     for e, b in zip(self.spec.state.entries(layer), cache.layer(layer), strict=True))

    def _capture(self, batch, input_ids, attention_mask, position_ids, past) -> _DecodeGraph:
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = _DecodeGraph(self.model, self._cache, batch, self._device, self._graph_pool, self.compile_decode)
        graph.capture(input_ids, attention_mask, position_ids, past)
        self._graphs[batch] = graph
        return graph


class _DecodeGraph:
    """One decode step (S = 1) over a static cache, captured in a CUDA graph; inputs go through fixed buffers."""

    def __init__(self, model, cache: StaticKVCache, batch: int, device: torch.device, pool, compile_step: bool):
        self.model, self.cache, self.pool = model, cache, pool
        # torch.compile fuses the small element-wise kernels (norms, rotary, mask, softmax) between
        # the GEMMs and the MoE kernels, which it calls as they are; it compiles during the warm-up.
        self.step = torch.compile(self._step, dynamic=False) if compile_step else self._step
        self.input_ids = torch.zeros(batch, 1, dtype=torch.int64, device=device)  # [B, 1]
        self.position_ids = torch.zeros(batch, 1, dtype=torch.int64, device=device)  # [B, 1]
        self.mask = torch.zeros(batch, cache.capacity, dtype=torch.int64, device=device)  # [B, C]
        self.cache_position = torch.zeros(1, dtype=torch.int64, device=device)  # [1]
        self.graph = torch.cuda.CUDAGraph()
        self.logits: torch.Tensor | None = None  # [B, 1, V], written by each replay

    def _step(self) -> torch.Tensor:
        out = self.model(
            self.input_ids, attention_mask=self.mask, position_ids=self.position_ids, use_cache=True,
            static_cache=self.cache, cache_position=self.cache_position,
        )  # fmt: skip
        return out.logits.float()  # [B, 1, V], cast inside the graph

    def _feed(self, input_ids, attention_mask, position_ids, past: int) -> None:
        self.input_ids.copy_(input_ids)
        self.position_ids.copy_(position_ids)
        self.mask.zero_()
        self.mask[:, : past + 1].copy_(attention_mask)
        self.cache_position.fill_(past)

    def capture(self, input_ids, attention_mask, position_ids, past: int) -> None:
        """Warm up on a side stream (Triton compiles, cuBLAS picks kernels), then capture one step.

        The warm-up steps run on this step's real inputs, so the cache positions they write hold
        the right values either way.
        """
        self._feed(input_ids, attention_mask, position_ids, past)
        side = torch.cuda.Stream(self.input_ids.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self.graph, pool=self.pool):
            self.logits = self.step()

    def run(self, input_ids, attention_mask, position_ids, past: int) -> None:
        self._feed(input_ids, attention_mask, position_ids, past)
        self.graph.replay()
