"""Polygraphy runners: the PyTorch reference as a ``BaseRunner``, and the artifact's runners.

The reference runner takes the artifact's feed dict (the graph inputs: ``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values.{i}.key|value``) and returns the same
output names as the (marked) artifact: ``logits``, ``present.*`` and the checkpoints of
:mod:`moetrt.parity.checkpoints`. It always computes in float32, whatever the artifact's dtype.

This module imports Polygraphy at the top; :mod:`moetrt.parity` imports it only when a comparison
runs, so the tolerance table works without Polygraphy installed.
"""

from __future__ import annotations

import importlib.util
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from moetrt import dtypes
from moetrt.errors import BackendMissingError, MoetrtError
from moetrt.model import MoETransformer
from moetrt.state import PAST_PREFIX, StateContract, state_contract

from .checkpoints import Checkpoint, ForcedRouting, capture, default_name

__all__ = ["TorchRunner", "ort_runner", "trt_runner", "onnx_for_tensorrt", "profile_shapes", "numpy_dtype"]


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype of an export dtype's KV cache (bf16 through ml_dtypes, which onnx depends on)."""
    return dtypes.numpy_dtype(dtypes.check_dtype(dtype))


class TorchRunner(BaseRunner):
    """The fp32 PyTorch reference behind Polygraphy's runner interface.

    ``infer(feed_dict, forced=...)`` may force some tokens' expert choice (see
    :func:`moetrt.parity.checkpoints.capture`); ``outputs`` names what it returns.
    ``last_logits``: return ``logits`` and the final norm's output for the last position only
    ([B, 1, ...]), as a folder optimized with ``--last-logits`` computes them.
    """

    def __init__(self, model: MoETransformer, input_dtype: str = "fp32", outputs: list[Checkpoint] | None = None,
                 name: str = "reference", last_logits: bool = False):
        super().__init__(name=name, prefix="torch-reference")
        if model.dtype != torch.float32:
            raise ValueError(f"the reference runs in float32; got a {model.dtype} model (call model.float())")
        self.model = model.eval()
        self.input_dtype = input_dtype
        self.outputs = outputs
        self.last_logits = last_logits

    def get_input_metadata_impl(self):
        cfg = self.model.config
        meta = TensorMetadata()
        for name in ("input_ids", "attention_mask", "position_ids"):
            meta.add(name, dtype=np.int64, shape=["batch_size", -1])
        state = state_contract(cfg)
        for i, entries in enumerate(state.layers):
            for e, name in zip(entries, state.past_names(i), strict=True):
                meta.add(name, dtype=numpy_dtype(e.element_dtype(self.input_dtype)),
                         shape=list(e.symbolic_shape(state.size_map, "batch_size", "past_sequence_length")))
        return meta

    def infer_impl(self, feed_dict, forced: ForcedRouting | None = None):
        cfg = self.model.config
        ids = torch.from_numpy(np.asarray(feed_dict["input_ids"], dtype=np.int64))
        mask = torch.from_numpy(np.asarray(feed_dict["attention_mask"], dtype=np.int64))
        positions = torch.from_numpy(np.asarray(feed_dict["position_ids"], dtype=np.int64))
        state = state_contract(cfg)
        past = [
            tuple(torch.from_numpy(np.asarray(feed_dict[name]).astype(np.float32)) for name in state.past_names(i))
            for i in range(cfg.num_hidden_layers)
        ]
        start = time.perf_counter()
        with torch.no_grad():
            with capture(self.model, forced) as values:
                out = self.model(ids, mask, positions, past)
        self.inference_time = time.perf_counter() - start
        values["logits"] = out.logits  # [B, S, V]
        if self.last_logits:
            for name in ("logits", default_name("norm", None)):
                if name in values:
                    values[name] = values[name][:, -1:]  # [B, 1, ...]
        for i, tensors in enumerate(out.past_key_values):
            values.update(zip(state.present_names(i), tensors, strict=True))
        # output name -> the captured value (graph outputs router_indices.{i} alias layers.{i}.router_indices)
        wanted = ({c.name: default_name(c.point, c.layer) for c in self.outputs} if self.outputs is not None
                  else {name: name for name in values})
        result = OrderedDict()
        for name, key in wanted.items():
            tensor = values[key]
            result[name] = tensor.numpy() if tensor.dtype == torch.int32 else tensor.float().numpy()
        return result


def ort_runner(model_path: str | Path, name: str = "ort", providers=("cpu",)):
    """Polygraphy's ``OnnxrtRunner`` on ``model_path``; the session is built now, so load errors surface here.

    ``providers``: execution providers in priority order, by prefix ("cpu", "cuda"). The session is
    ours rather than Polygraphy's ``SessionFromOnnx`` so that its threads do not spin between runs.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendMissingError("the ort back end needs onnxruntime: pip install 'moetrt[ort]'") from exc
    from polygraphy.backend.onnxrt import OnnxrtRunner

    options = ort.SessionOptions()
    # no busy-waiting between runs: the reference runs on the same cores right after each call
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    available = ort.get_available_providers()
    chosen = [next((a for a in available if a.lower().startswith(p.lower())), p) for p in providers]
    try:
        session = ort.InferenceSession(str(model_path), sess_options=options, providers=chosen)
    except Exception as exc:  # onnxruntime raises its own exception types
        hint = ""
        if "bfloat16" in str(exc).lower() or "NOT_IMPLEMENTED" in str(exc):
            hint = (" ONNX Runtime's CPU provider lacks kernels for some ops in this dtype (bf16 in particular): "
                    "compare this artifact with --backend trt, or export fp32/fp16 for ONNX Runtime.")
        raise MoetrtError(f"ONNX Runtime ({', '.join(providers)}) cannot load {model_path}: {exc}.{hint}") from exc
    return OnnxrtRunner(session, name=name)


def onnx_for_tensorrt(path: str | Path, plugins: str = "aot", num_tokens: int = 1) -> Path:
    """The ONNX file ``path`` made ready for TensorRT's parser exactly as ``moetrt optimize --target trt`` makes it
    (:func:`moetrt.optimize.trt.prepare_for_tensorrt`), saved beside it as ``<name>.trt.onnx``; returns that path."""
    import onnx_ir as ir

    from moetrt.optimize.trt.build import EXTERNAL_DATA_THRESHOLD
    from moetrt.optimize.trt.prepare import prepare_for_tensorrt

    path = Path(path)
    model = ir.load(path)
    prepare_for_tensorrt(model, plugins, num_tokens=max(1, num_tokens))
    out = path.with_name(f"{path.stem}.trt.onnx")
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    ir.save(model, out, external_data=f"{out.name}.data" if weight_bytes > EXTERNAL_DATA_THRESHOLD else None)
    return out


def trt_runner(path: str | Path, shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]],
               name: str = "trt", plugins: str = "aot"):
    """Polygraphy's ``TrtRunner`` on a serialized engine (``.engine``/``.plan``, e.g. ``moetrt optimize --target
    trt``'s ``model.engine``) or on an ONNX file TensorRT's parser accepts.

    An ONNX file is first prepared as ``optimize --target trt`` prepares it (:func:`onnx_for_tensorrt`,
    with ``plugins``), then parsed as a strongly typed network (precision comes from the ONNX, as
    TensorRT 11 requires) and built with one optimization profile whose ``(min, opt, max)`` shape
    per input is ``shapes[name]``. The engine is built once, here, so reactivating the runner is cheap.
    """
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        raise BackendMissingError(
            "the trt back end needs TensorRT (NVIDIA GPU with CUDA): pip install tensorrt; "
            "compare with --backend ort meanwhile"
        ) from exc
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import (CreateConfig, EngineFromBytes, EngineFromNetwork, NetworkFromOnnxPath,
                                        Profile, TrtRunner)

    if importlib.util.find_spec("moetrt.ops.plugins") is not None:
        from moetrt.ops.plugins import register_plugins

        register_plugins()  # the moetrt::TopKRouting / SparseMoE plugins, before parsing or deserializing
    path = Path(path)
    if path.suffix in (".engine", ".plan"):
        build = EngineFromBytes(BytesFromPath(str(path)))
    else:
        profile = Profile()
        for input_name, (low, opt, high) in shapes.items():
            profile.add(input_name, min=low, opt=opt, max=high)
        ids = shapes.get("input_ids")
        prepared = onnx_for_tensorrt(path, plugins, num_tokens=ids[1][0] * ids[1][1] if ids else 1)
        build = EngineFromNetwork(NetworkFromOnnxPath(str(prepared), strongly_typed=True),
                                  config=CreateConfig(profiles=[profile]))
    try:
        engine = build()
    except Exception as exc:  # Polygraphy raises PolygraphyException with TensorRT's log above it
        raise MoetrtError(f"TensorRT could not build or load an engine from {path}: {exc}") from exc
    return TrtRunner(engine, name=name)


def profile_shapes(feeds: list[dict[str, np.ndarray]], extra_lengths: tuple[int, int] = (1, 1),
                   state: StateContract | None = None):
    """One (min, opt, max) per input covering every feed, plus a batch-1 generation of ``extra_lengths``
    = (prompt length, total length). ``state``: the model's state contract, which says along which axis
    each ``past_key_values.*`` input holds its positions (default: key/value, ``[B, G, P, Hd]``)."""
    shapes: dict[str, list[tuple[int, ...]]] = {}
    for feed in feeds:
        for name, array in feed.items():
            shapes.setdefault(name, []).append(tuple(np.shape(array)))
    prompt, total = extra_lengths
    out = {}
    for name, seen in shapes.items():
        rank = len(seen[0])
        low = tuple(min([s[d] for s in seen] + ([1] if d == 0 else [])) for d in range(rank))
        high = [max(s[d] for s in seen) for d in range(rank)]
        if name in ("input_ids", "position_ids"):
            high[1] = max(high[1], prompt)
            low = (low[0], 1)
        elif name == "attention_mask":
            high[1] = max(high[1], total)
            low = (low[0], 1)
        elif name.startswith(PAST_PREFIX):  # key/value [B, G, P, Hd]; latent [B, P, R]; fixed-size state
            axis = 2 if state is None else state.entry_of(name)[1].concat_axis
            if axis is not None:
                high[axis] = max(high[axis], total)
                low = low[:axis] + (0,) + low[axis + 1:]
        out[name] = (low, tuple(high), tuple(high))
    return out
