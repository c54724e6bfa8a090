"""``compare(reference, artifact)``: does an artifact compute what the fp32 PyTorch model computes?

For each back end:

1. mark the checkpoints of :mod:`moetrt.parity.checkpoints` as outputs of a copy of the ONNX model
   (Polygraphy-style), so every layer's intermediate values come out beside ``logits`` and
   ``present.*``;
2. run the artifact's runner (Polygraphy's ``OnnxrtRunner`` or ``TrtRunner``) and the reference's
   (:class:`~moetrt.parity.runners.TorchRunner`) on the same inputs with Polygraphy's ``Comparator``
   (a prefill with left padding, then a continuation on the reference's KV cache);
3. compare expert choices per MoE layer (:mod:`moetrt.parity.router`); where the artifact broke a
   near-tie the other way, re-run the reference following the artifact's choice for those tokens
   (layer by layer, in order), so the rest of the comparison stays exact instead of being flooded
   by a legitimate difference;
4. compare every output with Polygraphy's ``SimpleCompareFunc`` (``elemwise`` check) under the
   tolerance table, the routing weights in expert order (an artifact whose ``logits`` hold the last
   position only, ``optimize --last-logits``, against the reference's last position);
5. name the first checkpoint, in forward order, that leaves tolerance (layer and op kind);
6. greedy-decode on both and explain any divergence (:mod:`moetrt.parity.generation`).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moetrt.artifact import METADATA_FILE, package_versions
from moetrt.config import MoEConfig
from moetrt.dtypes import ONNX_ELEM_TYPES
from moetrt.errors import BackendMissingError, MoetrtError
from moetrt.model import MoETransformer
from moetrt.state import PAST_PREFIX, StateContract, state_contract

from .checkpoints import Checkpoint, ForcedRouting, checkpoints_for, forward_order, mark_checkpoints
from .generation import greedy_agreement
from .report import BackendResult, CheckpointResult, ParityReport
from .router import RoutingEvent, layer_selection, near_tie_events, router_agreement
from .tolerances import DTYPES, Tolerance, resolve_tolerances

__all__ = ["compare", "default_inputs", "load_reference", "Artifact", "resolve_artifact", "BACKENDS"]

BACKENDS = ("ort", "trt")
ONNX_DTYPES = {elem: dtype for dtype, elem in ONNX_ELEM_TYPES.items()}  # onnx.TensorProto elem types of the KV cache
# config fields that must agree between the reference and the artifact's metadata
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "kv_lora_rank", "qk_rope_head_dim", "num_experts", "num_experts_per_tok")
_EXTERNAL_DATA_BYTES = 1 << 30


# --- inputs --------------------------------------------------------------------------------------
def load_reference(reference: Any) -> MoETransformer:
    """A float32 :class:`MoETransformer` from a model, preset name, checkpoint folder or transformers model."""
    if isinstance(reference, MoETransformer):
        model = reference
    else:
        from moetrt.checkpoint import from_pretrained

        model = from_pretrained(reference)
    if model.dtype != torch.float32:
        model = copy.deepcopy(model).float()  # the fp32 model is the truth; the caller's is left as it was
    return model.eval()


@dataclass
class Artifact:
    path: Path  # what the user named
    onnx: Path | None  # an ONNX model to run (ORT, or TensorRT building it)
    engine: Path | None  # a serialized TensorRT engine
    dtype: str | None
    config: dict | None  # from moetrt.json, when there is one
    last_logits: bool = False  # logits [B, 1, V]: the last position's only (optimize --last-logits)


def resolve_artifact(path: str | os.PathLike) -> Artifact:
    """An exported folder (``model.onnx`` / ``model.engine`` + ``moetrt.json``), an ``.onnx`` file or an engine file."""
    path = Path(path)
    if not path.exists():
        raise MoetrtError(f"artifact {path} does not exist; pass an exported folder (moetrt export) or a .onnx/.engine file")
    folder = path if path.is_dir() else path.parent
    meta = json.loads((folder / METADATA_FILE).read_text()) if (folder / METADATA_FILE).exists() else {}
    onnx_path = engine = None
    if path.is_dir():
        onnx_path = path / "model.onnx" if (path / "model.onnx").exists() else None
        engine = next((path / n for n in ("model.engine", "model.plan") if (path / n).exists()), None)
        if onnx_path is None and engine is None:
            raise MoetrtError(f"{path} holds neither model.onnx nor model.engine; pass the folder `moetrt export` wrote")
    elif path.suffix == ".onnx":
        onnx_path = path
    elif path.suffix in (".engine", ".plan"):
        engine = path
    else:
        raise MoetrtError(f"do not know how to run {path}: pass an exported folder, a .onnx file or a .engine/.plan file")
    dtype = meta.get("export", {}).get("dtype")
    if dtype is None and onnx_path is not None:
        import onnx

        proto = onnx.load(str(onnx_path), load_external_data=False)
        kv = next((i for i in proto.graph.input if i.name.startswith(PAST_PREFIX)), None)
        dtype = ONNX_DTYPES.get(kv.type.tensor_type.elem_type) if kv is not None else None
    return Artifact(path, onnx_path, engine, dtype, meta.get("config"), _last_logits(meta, onnx_path))


def _last_logits(meta: dict, onnx_path: Path | None) -> bool:
    """Whether the artifact's ``logits`` hold the last position only: from ``moetrt.json`` (``io``), else the graph."""
    shape = next((o.get("shape") for o in (meta.get("io") or {}).get("outputs", []) if o.get("name") == "logits"), None)
    if shape is None and onnx_path is not None and not meta:
        import onnx

        proto = onnx.load(str(onnx_path), load_external_data=False)
        output = next((o for o in proto.graph.output if o.name == "logits"), None)
        dims = output.type.tensor_type.shape.dim if output is not None else []
        shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
    return bool((meta.get("optimize") or {}).get("last_logits")) or (shape is not None and len(shape) == 3
                                                                     and shape[1] == 1)


def _check_same_model(config: MoEConfig, artifact: Artifact) -> None:
    if not artifact.config:
        return
    ours = config.to_dict()
    diff = [f"{k}: reference {ours.get(k)!r}, artifact {artifact.config.get(k)!r}"
            for k in _SHAPE_FIELDS if k in artifact.config and artifact.config.get(k) != ours.get(k)]
    if diff:
        raise MoetrtError(f"the artifact {artifact.path} was exported from another model ({'; '.join(diff)}); "
                          "compare it with the model it was exported from")


def default_inputs(model: MoETransformer, dtype: str = "fp32", batch: int = 2, seq: int = 16, new_tokens: int = 4,
                   seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Two feed dicts: a prefill of ``seq`` tokens (row 1 left-padded by 3), then ``new_tokens`` more on its KV cache.

    The cache fed to the second input is the reference's own (cast to the artifact's dtype), so
    both sides see the same inputs.
    """
    from .runners import numpy_dtype

    cfg = model.config
    if batch < 1 or seq < 1 or new_tokens < 0:
        raise MoetrtError(f"batch and seq must be >= 1 and new_tokens >= 0, got {batch}, {seq}, {new_tokens}")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + new_tokens), generator=gen)
    mask = torch.ones(batch, seq + new_tokens, dtype=torch.long)
    if batch > 1 and seq > 1:
        mask[1, : min(3, seq - 1)] = 0  # left padding, as batched generation builds it
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    state = state_contract(cfg)
    prefill = {"input_ids": ids[:, :seq].numpy(), "attention_mask": mask[:, :seq].numpy(),
               "position_ids": positions[:, :seq].numpy()}
    for i, entries in enumerate(state.layers):
        for e, name in zip(entries, state.past_names(i), strict=True):
            prefill[name] = np.zeros(e.shape(state.size_map, batch, 0), dtype=numpy_dtype(e.element_dtype(dtype)))
    feeds = [prefill]
    if new_tokens:
        with torch.no_grad():
            out = model(ids[:, :seq], mask[:, :seq], positions[:, :seq])
        follow = {"input_ids": ids[:, seq:].numpy(), "attention_mask": mask.numpy(),
                  "position_ids": positions[:, seq:].numpy()}
        for i, tensors in enumerate(out.past_key_values):
            for e, name, tensor in zip(state.entries(i), state.past_names(i), tensors, strict=True):
                follow[name] = tensor.numpy().astype(numpy_dtype(e.element_dtype(dtype)))
        feeds.append(follow)
    return feeds


def _describe_inputs(feeds, state: StateContract) -> list[dict]:
    names = ["prefill", "continuation"]
    out = []
    for n, feed in enumerate(feeds):
        batch, new = feed["input_ids"].shape
        past = state.past_length({k: np.shape(v) for k, v in feed.items()})
        out.append({"name": names[n] if n < len(names) and len(feeds) <= 2 else f"input {n}",
                    "batch": int(batch), "new_tokens": int(new), "past": int(past)})
    return out


# --- one back end --------------------------------------------------------------------------------
def _marked_model(onnx_path: Path, config: MoEConfig, folder: Path) -> tuple[Path, list[Checkpoint]]:
    """Write a copy of the model with the checkpoints marked as outputs into ``folder``."""
    import onnx

    proto = onnx.load(str(onnx_path))
    marked, checkpoints = mark_checkpoints(proto, config)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    large = sum(len(t.raw_data) for t in marked.graph.initializer) > _EXTERNAL_DATA_BYTES
    onnx.save(marked, str(path), save_as_external_data=large, location="model.onnx.data" if large else None)
    return path, checkpoints


def _graph_output_names(onnx_path: Path) -> list[str]:
    import onnx

    return [o.name for o in onnx.load(str(onnx_path), load_external_data=False).graph.output]


def _artifact_runner(backend: str, path: Path, feeds, generation_lengths: tuple[int, int], state: StateContract):
    from .runners import ort_runner, profile_shapes, trt_runner

    if backend == "ort":
        return ort_runner(path, name="ort")
    return trt_runner(path, profile_shapes(feeds, generation_lengths, state), name="trt")


def _sorted_routing(result):
    """Polygraphy postprocess: routing weights in expert order, so the order among the k chosen never matters."""
    for name in list(result.keys()):
        if "router_weights" in name:
            indices = _get(result, name.replace("router_weights", "router_indices"))
            if indices is not None:
                order = np.argsort(np.asarray(indices), axis=-1, kind="stable")
                result[name] = np.take_along_axis(np.asarray(result[name]), order, axis=-1)
    return result


def _real_tokens(feed) -> np.ndarray:
    """[B, S] bool: the new tokens that are not padding."""
    new = np.asarray(feed["input_ids"]).shape[1]
    return np.asarray(feed["attention_mask"])[:, -new:] == 1 if new else np.zeros((len(feed["input_ids"]), 0), bool)


def _zero_padding(result, checkpoints: dict[str, Checkpoint], feed, state: StateContract) -> None:
    """Zero the values at padding positions in one IterationResult, in place.

    A padded position's attention row is fully masked, so what it computes is arbitrary (and
    differs between precisions); it feeds nothing a real token uses, so it is not compared.
    A state output (``present.*``) is masked along the axis its entry grows by (``state``).
    """
    real = _real_tokens(feed)  # [B, S]
    full = np.asarray(feed["attention_mask"]) == 1  # [B, P+S]
    if real.all():
        return
    for name in list(result.keys()):
        c = checkpoints.get(name)
        if c is None or c.point == "router_indices":
            continue
        array = np.array(result[name])
        if c.point.startswith("present."):
            entry = state.entry_of(name)[1]
            if not entry.grows:  # fixed-size state: no positions to mask
                continue
            axis = entry.concat_axis  # [B, G, P+S, Hd] for key/value: axis 2; [B, P+S, R] for latent: axis 1
            padding = np.expand_dims(~full, tuple(d for d in range(1, array.ndim) if d != axis))
            array[np.broadcast_to(padding, array.shape)] = 0
        elif array.ndim >= 2 and array.shape[:2] == real.shape:
            array[~real] = 0
        elif array.shape[0] == real.size:
            array[~real.reshape(-1)] = 0
        result[name] = array


def _resolve_routing(reference_runner, feed, ref_out, art_out, config: MoEConfig, gap: float, input_index: int):
    """Follow the artifact's near-tie choices, first MoE layer first. Returns (reference outputs, layer -> events)."""
    forced: ForcedRouting = {}
    events: dict[int, dict[int, RoutingEvent]] = {}
    layers = [i for i in config.moe_layers
              if f"layers.{i}.router_indices" in art_out and f"layers.{i}.router_logits" in ref_out]
    for _ in range(len(layers) + 1):
        new_layer = None
        for layer in layers:
            found = near_tie_events(layer, ref_out[f"layers.{layer}.router_logits"],
                                    ref_out[f"layers.{layer}.router_indices"],
                                    art_out[f"layers.{layer}.router_indices"],
                                    **layer_selection(config, layer, reference_runner.model), gap_tolerance=gap, input_index=input_index, valid=_real_tokens(feed))
            new = {t: e for t, e in found.items() if t not in events.get(layer, {})}
            if new:
                events.setdefault(layer, {}).update(new)
                new_layer = layer
                break
        if new_layer is None:
            break
        rows = np.asarray(sorted(events[new_layer]), dtype=np.int64)
        forced[new_layer] = (rows, np.asarray(art_out[f"layers.{new_layer}.router_indices"])[rows])
        ref_out = reference_runner.infer(feed, forced=forced)
    return ref_out, events


def _artifact_checkpoints(backend: str, artifact: Artifact, config: MoEConfig, localize: bool, workdir: Path):
    """(path the runner loads, checkpoints it may expose): a marked copy of the ONNX model, or the graph outputs."""
    if backend == "ort":
        if artifact.onnx is None:
            raise MoetrtError(f"the ort back end needs an ONNX model; {artifact.path} holds only a TensorRT engine")
        path = artifact.onnx
    else:
        path = artifact.engine or artifact.onnx
    if localize and path.suffix == ".onnx":
        return _marked_model(path, config, workdir / backend)
    if path.suffix != ".onnx":  # a serialized engine: whatever it outputs
        return path, checkpoints_for(config)
    names = set(_graph_output_names(path))
    checkpoints = checkpoints_for(config, names)
    # the outputs of an export with router_outputs=True stand in for the router checkpoints
    checkpoints += [Checkpoint(f"router_{p}.{i}", f"router_{p}", i) for i in config.moe_layers
                    for p in ("indices", "weights") if f"router_{p}.{i}" in names]
    checkpoints.sort(key=lambda c: forward_order(c, config.num_hidden_layers))
    return path, checkpoints


def _routing(reference_runner, feeds, art_iters, ref_iters, config: MoEConfig, gap: float) -> dict:
    """Per MoE layer, router agreement over every input; near-ties are followed first (``ref_iters`` is updated)."""
    from polygraphy.comparator import IterationResult

    routers: dict = {}
    with reference_runner:
        for n, feed in enumerate(feeds):
            ref_out, events = _resolve_routing(reference_runner, feed, ref_iters[n], art_iters[n], config, gap, n)
            if events:
                ref_iters[n] = IterationResult(outputs=OrderedDict(ref_out), runner_name=reference_runner.name)
            for layer in config.moe_layers:
                indices = (f"layers.{layer}.router_indices", f"router_indices.{layer}")
                ref_logits = _get(ref_iters[n], f"layers.{layer}.router_logits")
                art_idx, ref_idx = _get(art_iters[n], *indices), _get(ref_iters[n], *indices)
                if ref_logits is None or art_idx is None or ref_idx is None:
                    continue
                result = router_agreement(layer, ref_logits, ref_idx, art_idx,
                                          **layer_selection(config, layer, reference_runner.model), gap_tolerance=gap,
                                          input_index=n, forced=events.get(layer), valid=_real_tokens(feed))
                if layer in routers:
                    routers[layer].merge(result)
                else:
                    routers[layer] = result
    return routers


def _compare_backend(backend: str, model: MoETransformer, artifact: Artifact, dtype: str, feeds, tolerances,
                     *, localize: bool, prompt: list[int], steps: int, workdir: Path, verbose: bool) -> BackendResult:
    from polygraphy.comparator import Comparator, RunResults
    from polygraphy.logger import G_LOGGER

    from .runners import TorchRunner, numpy_dtype

    cfg = model.config
    gap = tolerances["router_gap"].atol
    path, checkpoints = _artifact_checkpoints(backend, artifact, cfg, localize, workdir)
    with G_LOGGER.verbosity(G_LOGGER.INFO if verbose else G_LOGGER.CRITICAL):
        # 1. run both; the reference returns what the artifact exposes (plus router logits for the gaps)
        art_runner = _artifact_runner(backend, path, feeds, (len(prompt), len(prompt) + steps), state_contract(cfg))
        art_run = Comparator.run([art_runner], data_loader=feeds)
        produced = set(art_run[0][1][0].keys())
        checkpoints = [c for c in checkpoints if c.name in produced]
        ref_runner = TorchRunner(model, dtype, _reference_outputs(checkpoints), name="reference",
                                 last_logits=artifact.last_logits)  # then compared on the last position
        ref_run = Comparator.run([ref_runner], data_loader=feeds)
        art_iters, ref_iters = art_run[0][1], ref_run[0][1]

        # 2. routing, following the artifact's near-ties
        routers = _routing(ref_runner, feeds, art_iters, ref_iters, cfg, gap)

        # 3. every value under its tolerance (padding positions excluded, routing weights in expert order)
        by_name, state = {c.name: c for c in checkpoints}, state_contract(cfg)
        for n, feed in enumerate(feeds):
            _zero_padding(art_iters[n], by_name, feed, state)
            _zero_padding(ref_iters[n], by_name, feed, state)
        run_results = RunResults()
        run_results.append((art_runner.name, art_iters))
        run_results.append((ref_runner.name, ref_iters))
        Comparator.postprocess(run_results, _sorted_routing)
        compare_func, compared = _compare_func(checkpoints, tolerances)
        accuracy = Comparator.compare_accuracy(run_results, comparisons=[(0, 1)], compare_func=compare_func)
        per_output = _per_output(accuracy, (art_runner.name, ref_runner.name))

        # 4. greedy generation
        generation = None
        if steps > 0:
            with art_runner, ref_runner:
                generation = greedy_agreement(ref_runner, art_runner, cfg, prompt=prompt, steps=steps,
                                              kv_dtype=numpy_dtype(dtype), gap_tolerance=gap,
                                              logits_tolerance=tolerances["logits"])

    results = []
    for c in checkpoints:
        if c.point == "router_indices":
            passed = c.layer not in routers or routers[c.layer].passed
            results.append(CheckpointResult(c.name, c.point, c.layer, c.kind, None, None, None, None, None, passed))
        elif c.name in compared and c.name in per_output:
            max_abs, max_rel, passed = per_output[c.name]
            tol = tolerances[c.tolerance_kind]
            results.append(CheckpointResult(c.name, c.point, c.layer, c.kind, c.tolerance_kind, max_abs, max_rel,
                                            tol.atol, tol.rtol, passed))
    missing = [c.name for c in checkpoints_for(cfg) if c.name not in produced]
    return BackendResult(backend, results, [routers[k] for k in sorted(routers)], generation, missing,
                         num_layers=cfg.num_hidden_layers, moe_layers=list(cfg.moe_layers))


def _get(result, *names):
    """The first of ``names`` an IterationResult holds, as an array, or None."""
    return next((np.asarray(result[n]) for n in names if n in result), None)


def _reference_outputs(checkpoints: list[Checkpoint]) -> list[Checkpoint]:
    """What the reference must return: the artifact's checkpoints plus the router logits that near-tie analysis needs."""
    out = list(checkpoints)
    names = {c.name for c in out}
    for c in checkpoints:
        if c.point == "router_indices" or c.name.startswith("router_indices."):
            logits = f"layers.{c.layer}.router_logits"
            if logits not in names:
                out.append(Checkpoint(logits, "router_logits", c.layer))
                names.add(logits)
    return out


def _compare_func(checkpoints: list[Checkpoint], tolerances: dict[str, Tolerance]):
    """Polygraphy's SimpleCompareFunc with each output's tolerance; indices are left to the router analysis."""
    from polygraphy.comparator import compare as polygraphy_compare

    atol, rtol = {}, {}
    compared = set()
    for c in checkpoints:
        if c.tolerance_kind is None:
            continue
        tol = tolerances[c.tolerance_kind]
        atol[c.name], rtol[c.name] = tol.atol, tol.rtol
        compared.add(c.name)

    def find_output(name, _index, iter_result, **_kwargs):
        return [name] if name in compared and name in iter_result else None

    options = dict(atol=atol, rtol=rtol, check_error_stat="elemwise", find_output_func=find_output)
    simple = getattr(polygraphy_compare, "SimpleCompareFunc", None)
    if simple is not None:  # Polygraphy >= 0.50
        return simple(**options), compared
    return polygraphy_compare.CompareFunc.simple(**options), compared


def _per_output(accuracy, pair) -> dict[str, tuple[float, float, bool]]:
    """output name -> (max abs, max rel, passed) over every compared input."""
    result = accuracy[0] if isinstance(accuracy, (list, tuple)) or type(accuracy).__name__ == "AccuracyResults" else accuracy
    out: dict[str, tuple[float, float, bool]] = {}
    for match in result[pair]:
        for name, compared in match.items():
            max_abs = float(getattr(compared, "max_absdiff", 0.0 if compared else float("inf")))
            max_rel = float(getattr(compared, "max_reldiff", 0.0 if compared else float("inf")))
            prev = out.get(name, (0.0, 0.0, True))
            out[name] = (_nanmax(prev[0], max_abs), _nanmax(prev[1], max_rel), prev[2] and bool(compared))
    return out


def _nanmax(a: float, b: float) -> float:
    return float("nan") if np.isnan(a) or np.isnan(b) else max(a, b)


# --- the public entry point ----------------------------------------------------------------------
def compare(
    reference: Any,
    artifact: str | os.PathLike,
    *,
    backends: list[str] | tuple[str, ...] = ("ort",),
    dtype: str | None = None,
    tolerances: dict | None = None,
    inputs: list[dict[str, np.ndarray]] | None = None,
    batch: int = 2,
    seq: int = 16,
    new_tokens: int = 4,
    steps: int = 16,
    prompt: list[int] | None = None,
    seed: int = 0,
    localize: bool = True,
    report_dir: str | os.PathLike | None = None,
    verbose: bool = False,
) -> ParityReport:
    """Compare ``artifact`` with the fp32 PyTorch ``reference`` on each back end; returns a :class:`ParityReport`.

    ``reference``: a :class:`MoETransformer`, preset name, checkpoint folder or transformers model.
    ``artifact``: an exported folder, ``.onnx`` file or TensorRT engine. ``dtype``: the artifact's
    (default: from ``moetrt.json`` or the graph), selecting the tolerance row. ``tolerances``:
    overrides, ``{kind: (atol, rtol)}`` or ``{(dtype, kind): Tolerance}``. ``inputs``: feed dicts
    in the graph's naming (default: :func:`default_inputs` with ``batch``, ``seq``, ``new_tokens``,
    ``seed``). ``steps``: greedy generation steps from ``prompt`` (default: the first row of the
    first input); 0 skips generation. ``localize=False`` compares graph outputs only.
    ``report_dir``: also write ``report.json``, ``report.md`` and ``parity.png`` there.
    """
    for backend in backends:
        if backend not in BACKENDS:
            raise MoetrtError(f"unknown back end {backend!r}; choose from {', '.join(BACKENDS)}")
    if not backends:
        raise MoetrtError(f"name at least one back end ({', '.join(BACKENDS)})")
    try:
        import polygraphy  # noqa: F401
    except ImportError as exc:
        raise BackendMissingError("parity needs Polygraphy: pip install 'moetrt[parity]'") from exc
    model = load_reference(reference)
    art = resolve_artifact(artifact)
    dtype = dtype or art.dtype
    if dtype not in DTYPES:
        raise MoetrtError(f"cannot tell the artifact's dtype; pass dtype= (--dtype) one of {', '.join(DTYPES)}"
                          if dtype is None else f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    _check_same_model(model.config, art)
    try:
        tols = resolve_tolerances(dtype, tolerances)
    except ValueError as exc:
        raise MoetrtError(str(exc)) from exc
    feeds = list(inputs) if inputs is not None else default_inputs(model, dtype, batch, seq, new_tokens, seed)
    if prompt is None:
        first = feeds[0]
        row = np.asarray(first["input_ids"])[0]
        prompt = row[np.asarray(first["attention_mask"])[0][-len(row):] == 1].tolist()
    results = {}
    with tempfile.TemporaryDirectory(prefix="moetrt-parity-") as tmp:
        for backend in backends:
            results[backend] = _compare_backend(backend, model, art, dtype, feeds, tols, localize=localize,
                                                prompt=list(prompt), steps=steps, workdir=Path(tmp), verbose=verbose)
    source = reference if isinstance(reference, (str, os.PathLike)) else type(reference).__name__
    report = ParityReport(
        reference=str(source), artifact=str(art.path), dtype=dtype, tolerances=tols,
        inputs=_describe_inputs(feeds, state_contract(model.config)),
        backends=results, versions=package_versions(),
    )
    if report_dir is not None:
        report.write(report_dir)
    return report
