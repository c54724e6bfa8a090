"""Hugging Face checkpoints in and out: config.json + safetensors (single or sharded).

What is generic lives here: reading safetensors (whole files, or headers and byte ranges for
streaming), placing tensors into a model, writing a checkpoint. What depends on the family
(config translation, tensor names and transforms, the reverse mapping) is asked of its module in
:mod:`moetrt.families`. Every checkpoint tensor is either used or reported: an unknown tensor is
an error, a derived buffer (``rotary_emb.inv_freq``) a warning.

:func:`checkpoint_sources` says where each parameter's data lies without reading it (the
safetensors headers only), for the streaming export: it accepts and rejects exactly what
:func:`from_pretrained` does, through the same placement rules (``_Placer``).

FP8 block-quantized checkpoints (config.json ``quantization_config.quant_method`` ``"fp8"``:
DeepSeek-V3, Kimi-K2) are read for every family here, not in the families: each float8_e4m3fn
tensor is dequantized exactly with its ``*_scale_inv`` companion before the family's transform
(:mod:`moetrt.fp8`), and ``MoEConfig.extra["source_quantization"]`` records the source format.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moetrt import families
from moetrt.config import PRESETS, MoEConfig
from moetrt.errors import CheckpointError, MoetrtError, UnsupportedModelError
from moetrt.families import COMPANION, DERIVED, SKIPPED, SUPPORTED_MODEL_TYPES, Placement
from moetrt.fp8 import FLOAT8_DTYPES, FP8_DTYPE, FP8Scheme, is_scale_name, scale_name, scale_shape
from moetrt.model import MoETransformer, full_rotary_embedding, rotary_embedding

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "from_pretrained",
    "config_from_hf",
    "hf_config_from_config",
    "save_pretrained",
    "PRESET_DIR",
    "checkpoint_sources",
    "ParamSource",
    "StoredTensor",
    "read_safetensors_header",
]

PRESET_DIR = Path(__file__).parent / "presets"
# presets whose trained weights ship inside the package
SHIPPED_PRESETS = ("tiny",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")  # the chat template newer transformers saves beside tokenizer_config.json


# --- presets -------------------------------------------------------------------------------------
def preset_name(source: Any, warn: bool = True) -> str | None:
    """``source`` as a preset name, or None (a path or a model object).

    A bare preset name (the string ``"tiny"``) always means the preset, even where a folder of that
    name exists (then a warning says so, and that ``"./tiny"`` names the folder); a ``Path`` or a
    string with a path separator is a path. So one string never means two things.
    """
    if not isinstance(source, str) or source not in PRESETS:
        return None
    if warn and Path(source).exists():
        warnings.warn(f"{source!r} is taken as moetrt's preset {source}, not the folder {source} here; "
                      f"write ./{source} for the folder")
    return source


def preset_parameters(name: str) -> int:
    """Parameters of the preset's model, counted without allocating it."""
    with torch.device("meta"):
        return sum(p.numel() for p in MoETransformer(MoEConfig.from_name(name)).parameters())


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation here (MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass  # no /proc/meminfo (not Linux) or an unexpected format: try the next source
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def runnable_presets() -> list[str]:
    """The presets whose model fits in this machine's available memory (the trained ones always)."""
    available = _available_memory()
    return [n for n in sorted(PRESETS)
            if n in SHIPPED_PRESETS or available is None or 4 * preset_parameters(n) < available / 2]


def _unknown_source(name: str) -> CheckpointError:
    return CheckpointError(f"{name!r} is neither an existing folder nor a preset; presets: {', '.join(runnable_presets())}")

# --- config ----------------------------------------------------------------------------------
def config_from_hf(hf: dict[str, Any]) -> MoEConfig:
    """Translate a transformers ``config.json`` dict into a :class:`MoEConfig` (through its family)."""
    family = families.get(hf.get("model_type"))
    try:
        return family.config_from_hf(hf)
    except ValueError as exc:  # MoEConfig's validation: the file holds an impossible config
        raise CheckpointError(f"config.json of this {hf.get('model_type')} checkpoint is invalid: {exc}") from exc


def hf_config_from_config(cfg: MoEConfig) -> dict[str, Any]:
    """The transformers ``config.json`` for ``cfg`` in its own family; errors if the family cannot say it."""
    model_type = cfg.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(f"cannot save model_type {model_type!r}; {families.supported_message()}")
    family = families.get(model_type)
    problems = family.inexpressible(cfg)
    if problems:
        raise UnsupportedModelError(
            f"a {model_type} config cannot express: {'; '.join(problems)}; set MoEConfig.model_type to a "
            f"family that has these options ({', '.join(SUPPORTED_MODEL_TYPES)}), or export the model to ONNX "
            "without a Hugging Face checkpoint"
        )
    return {**family.common_hf_config(cfg), **family.hf_config(cfg)}


# --- reading -----------------------------------------------------------------------------------
def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc}); re-download the checkpoint") from exc
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(
                f"{folder} is missing shard(s) named in model.safetensors.index.json: {', '.join(missing)}; "
                "re-download the checkpoint"
            )
        return files
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return shards
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise CheckpointError(
            f"{folder} holds PyTorch pickle weights (*.bin/*.pt) but no *.safetensors; moetrt reads only "
            "safetensors: convert with transformers (model.save_pretrained(dir, safe_serialization=True))"
        )
    raise CheckpointError(
        f"{folder} has no model.safetensors (or sharded *.safetensors + index); copy the weight files into it, "
        "or write them with moetrt.save_pretrained"
    )


def iter_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one tensor at a time from every shard of a checkpoint folder."""
    from safetensors import safe_open

    for path in _shard_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types for corrupt headers/data
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(
                f"cannot read {path}: {exc}; the file is corrupt or truncated, re-download it"
            ) from exc


def _read_config_json(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder} has no config.json; point at a Hugging Face checkpoint folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from exc


def _empty_model(cfg: MoEConfig, dtype: torch.dtype) -> MoETransformer:
    """A model with allocated but uninitialised weights (the loader fills every one)."""
    with torch.device("meta"):
        model = MoETransformer(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    model.rotary = rotary_embedding(cfg)  # buffers are derived, not loaded
    model.rotary_full = full_rotary_embedding(cfg)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def _stacked(key: str) -> bool:
    return key.endswith(".experts.gate_up_proj") or key.endswith(".experts.down_proj")


def _expert_parts(key: str) -> tuple[str, ...]:
    return ("down",) if key.endswith("down_proj") else ("gate", "up")


class _Placer:
    """Where each checkpoint tensor goes in a model of ``cfg``; what is left unfilled or unused at the end.

    ``shapes``: parameter name -> shape, tied parameters under both names. Shared by the loader
    (which copies each tensor as it comes) and :func:`checkpoint_sources` (which only notes where
    each tensor lies), so both accept and reject exactly the same checkpoints. The family says
    where a tensor goes (:meth:`moetrt.families.Family.place`); this checks shapes and coverage.
    """

    def __init__(self, cfg: MoEConfig, shapes: dict[str, tuple[int, ...]], source: str, fp8: FP8Scheme | None = None):
        self.cfg, self.shapes, self.source, self.fp8 = cfg, shapes, source, fp8
        # FP8 checkpoints: scale name -> (its shape, dtype); scale name -> (the shape it must have, weight, its shape)
        self.fp8_scales: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.fp8_expected: dict[str, tuple[tuple[int, ...], str, tuple[int, ...]]] = {}
        self.fp8_skipped: set[str] = set()  # scales of skipped FP8 tensors
        self.family = families.get(cfg.model_type)
        self.filled: set[str] = set()
        self.filled_parts: set[tuple[str, int, str]] = set()
        self.unused: list[str] = []
        self.derived: list[str] = []
        self.skipped: list[str] = []  # tensors transformers does not load either (Family.skipped_reason)
        self.companions: set[str] = set()  # companion tensors seen
        self.needed: dict[str, str] = {}  # companion name -> the tensor whose transform reads it

    def _check(self, dst_name: str, dst_shape: tuple[int, ...], src_name: str, shape: tuple[int, ...], dtype) -> None:
        if tuple(dst_shape) != tuple(shape):
            raise CheckpointError(
                f"{self.source}: tensor {src_name!r} has shape {tuple(shape)}, the config implies "
                f"{tuple(dst_shape)} for {dst_name}; config.json and the weights disagree: use the config.json that came with these weights"
            )
        if dtype is not None and not dtype.is_floating_point:
            raise CheckpointError(f"{self.source}: tensor {src_name!r} has dtype {dtype}; expected floating point")

    def place(self, raw_name: str, shape: tuple[int, ...], dtype: torch.dtype) -> list[Placement] | None:
        """The placements checkpoint tensor ``raw_name`` fills, or None if it fills none.

        A placement with ``expert`` set fills one expert of a stacked ``[E, 2F, D]`` / ``[E, D, F]``
        parameter (``part``: its gate or up rows; None: all of them). In an FP8 checkpoint
        (:mod:`moetrt.fp8`) every scale is a companion and every FP8 tensor is dequantized with its
        scale before the family's own transform: any family reads FP8 checkpoints.
        """
        stored_fp8 = dtype in FLOAT8_DTYPES
        if stored_fp8 and self.fp8 is None:
            raise CheckpointError(
                f"{self.source}: tensor {raw_name!r} is stored as {dtype}, but config.json has no quantization_config "
                "with quant_method 'fp8' to say how to scale it; use the config.json that came with these weights"
            )
        if stored_fp8 and dtype != FP8_DTYPE:
            raise UnsupportedModelError(
                f"{self.source}: tensor {raw_name!r} is stored as {dtype}; moetrt reads FP8 weights in {FP8_DTYPE} "
                "(e4m3) only: use the e4m3 release or a bf16 checkpoint"
            )
        if self.fp8 is not None and is_scale_name(raw_name):
            self.companions.add(raw_name)
            self.fp8_scales[raw_name] = (tuple(shape), dtype)
            self._check_fp8_scale(raw_name)
            return None
        where = self.family.place(raw_name, tuple(shape), self.cfg, self.shapes)
        if where is None:
            self.unused.append(raw_name)
            return None
        if where == DERIVED:
            self.derived.append(raw_name)
            return None
        if where == SKIPPED:
            self.skipped.append(raw_name)
            if stored_fp8:  # its scale goes with it
                self.fp8_skipped.add(scale_name(raw_name))
            return None
        if where == COMPANION:
            self.companions.add(raw_name)
            return None
        for p in where:
            if p.expert is None:
                dst_name, dst_shape = p.key, tuple(self.shapes[p.key])
            else:
                dst_shape = list(self.shapes[p.key][1:])  # [D, F] or [2F, D]
                if p.part is not None:
                    dst_shape[0] = self.cfg.intermediate_size  # the gate or the up rows
                part = p.part or "/".join(_expert_parts(p.key))
                dst_name, dst_shape = f"{p.key}[{p.expert}] ({part})", tuple(dst_shape)
            if p.transform is None:
                self._check(dst_name, dst_shape, raw_name, shape, dtype)
            elif p.stored_shape is not None:  # the transform checks the dtype (MXFP4 blocks are uint8)
                self._check(dst_name, p.stored_shape, raw_name, shape, None)
            for need in p.needs:
                self.needed[need] = raw_name
            if p.expert is None:
                self.filled.add(p.key)
            else:
                for part in (p.part,) if p.part is not None else _expert_parts(p.key):
                    self.filled_parts.add((p.key, p.expert, part))
        if stored_fp8 and where:
            where = self.fp8.placements(where, raw_name)
            scale = where[0].needs[0]
            self.needed[scale] = raw_name
            self.fp8_expected[scale] = (scale_shape(tuple(shape), self.fp8.block), raw_name, tuple(shape))
            self._check_fp8_scale(scale)
        return where

    def finish(self) -> None:
        """Raise if a tensor had no place or a parameter was not filled; warn about ignored buffers."""
        cfg, filled, filled_parts = self.cfg, set(self.filled), self.filled_parts
        for key in [k for k in self.shapes if _stacked(k)]:
            if key not in filled and all((key, e, p) in filled_parts
                                         for e in range(cfg.num_experts) for p in _expert_parts(key)):
                filled.add(key)
        if cfg.tie_word_embeddings and "embed_tokens.weight" in filled:
            filled.add("lm_head.weight")
        missing = sorted(set(self.shapes) - filled)
        for i, key in enumerate(missing):  # a stacked expert tensor filled in part: say which parts lack
            if _stacked(key):
                lacking = [f"expert {e} {p}" for e in range(cfg.num_experts) for p in _expert_parts(key)
                           if (key, e, p) not in filled_parts]
                if len(lacking) < cfg.num_experts * len(_expert_parts(key)):
                    missing[i] = f"{key} ({', '.join(lacking[:4])}{', ...' if len(lacking) > 4 else ''})"
        missing += [f"{need} (read with {by})" for need, by in sorted(self.needed.items()) if need not in self.companions]
        self.skipped += sorted(self.companions & self.fp8_skipped)
        unused = self.unused + sorted(self.companions - set(self.needed) - self.fp8_skipped)
        if unused:
            raise CheckpointError(
                f"{self.source}: {len(unused)} checkpoint tensor(s) have no place in a {cfg.model_type} model "
                f"with this config (first: {', '.join(unused[:5])}); config.json and the weights disagree: use the config.json that came with these weights"
            )
        if missing:
            raise CheckpointError(
                f"{self.source}: {len(missing)} tensor(s) the config needs are missing from the checkpoint "
                f"(first: {', '.join(missing[:5])}); the checkpoint is incomplete or of another architecture"
            )
        self._finish_fp8()
        if self.skipped:
            warnings.warn(
                f"{self.source}: skipped {len(self.skipped)} tensor(s) ({self.skipped[0]}, ...): "
                f"{self.family.skipped_reason}"
            )
        if self.derived:
            warnings.warn(
                f"{self.source}: ignored {len(self.derived)} derived buffer(s) recomputed from the config (rotary inv_freq)"
            )

    def _check_fp8_scale(self, scale: str) -> None:
        """Once an FP8 scale and its weight have both been seen: the scale's dtype and its block grid."""
        if scale not in self.fp8_scales or scale not in self.fp8_expected:
            return
        bn, bk = self.fp8.block
        expected, weight, weight_shape = self.fp8_expected[scale]
        shape, dtype = self.fp8_scales[scale]
        if not dtype.is_floating_point or dtype in FLOAT8_DTYPES:
            raise CheckpointError(
                f"{self.source}: FP8 scale {scale!r} has dtype {dtype}; expected float32 (one scale per block, "
                "quantization_config.scale_fmt 'float')"
            )
        if shape != expected:
            raise CheckpointError(
                f"{self.source}: FP8 scale {scale!r} has shape {shape}, but weight {weight!r} {weight_shape} in "
                f"blocks of [{bn}, {bk}] needs {expected} ([..., ceil(N/{bn}), ceil(K/{bk})]); "
                "quantization_config.weight_block_size and the weights disagree"
            )

    def _finish_fp8(self) -> None:
        """Record the source format in ``cfg.extra`` (every scale was checked as it met its weight)."""
        if self.fp8 is not None and self.fp8_expected:  # what the GPU path needs to use the FP8 bytes as they are
            self.cfg.extra["source_quantization"] = self.fp8.record(len(self.fp8_expected))


def _apply(p: Placement, tensor: torch.Tensor, companions: list[torch.Tensor]) -> torch.Tensor:
    """The values placement ``p`` writes, from its stored tensor (and companions)."""
    if p.select is not None:
        def pick(t: torch.Tensor) -> torch.Tensor:  # one row, or one of `blocks` equal blocks, of the first axis
            return t[p.select] if p.blocks is None else t.unflatten(0, (p.blocks, -1))[p.select]

        tensor, companions = pick(tensor), [pick(c) for c in companions]
    return tensor if p.transform is None else p.transform(tensor, *companions)


def load_state(model: MoETransformer, tensors: Iterator[tuple[str, torch.Tensor]], source: str,
               fp8: FP8Scheme | None = None) -> None:
    """Copy checkpoint tensors into ``model``; every parameter must be filled, every tensor used.

    A tensor whose transform reads companions (MXFP4 blocks and their scales) waits until they
    have been read too. ``fp8``: the checkpoint's FP8 scheme (:meth:`FP8Scheme.from_hf`), if any.
    """
    cfg = model.config
    params = dict(model.named_parameters(remove_duplicate=False))
    placer = _Placer(cfg, {name: tuple(p.shape) for name, p in params.items()}, source, fp8)
    ffn = cfg.intermediate_size
    companions: dict[str, torch.Tensor] = {}
    waiting: list[tuple[list[Placement], torch.Tensor]] = []

    def write(placements: list[Placement], tensor: torch.Tensor) -> None:
        for p in placements:
            dst = params[p.key] if p.expert is None else params[p.key][p.expert]  # [D, F] or [2F, D] for one expert
            if p.part == "gate":
                dst = dst[:ffn]
            elif p.part == "up":
                dst = dst[ffn:]
            with torch.no_grad():
                dst.copy_(_apply(p, tensor, [companions[n] for n in p.needs]))

    for raw_name, tensor in tensors:
        placements = placer.place(raw_name, tuple(tensor.shape), tensor.dtype)
        if raw_name in placer.companions:
            companions[raw_name] = tensor
        elif placements is not None:
            waiting.append((placements, tensor))
        still = []
        for placements, tensor in waiting:
            if all(n in companions for p in placements for n in p.needs):
                write(placements, tensor)
            else:
                still.append((placements, tensor))
        waiting = still
    placer.finish()
    nonfinite = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if nonfinite:
        warnings.warn(f"{source}: non-finite values (NaN/Inf) in {', '.join(nonfinite[:5])}; outputs will be NaN")


# --- streaming: where each parameter lies on disk, read one tensor at a time --------------------
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file, read on demand with a single file read.

    Plain reads rather than a memory map: mapped pages of a multi-GB shard count towards the
    process's resident memory for as long as the file stays mapped.
    """

    path: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of the first byte, from the start of the file
    nbytes: int

    def read(self) -> torch.Tensor:
        if self.nbytes == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        buffer = bytearray(self.nbytes)
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            got = f.readinto(buffer)
        if got != self.nbytes:
            raise CheckpointError(
                f"cannot read {self.path}: tensor {self.name!r} is cut short ({got} of {self.nbytes} bytes); "
                "the file is truncated, re-download it"
            )
        return torch.frombuffer(buffer, dtype=torch.uint8).view(self.dtype).reshape(self.shape)

    def select(self, index: int, blocks: int | None = None) -> "StoredTensor":
        """Row ``index`` of the first axis (one expert of a stacked tensor), read on its own; with ``blocks``,
        block ``index`` of that many equal blocks of the first axis (one expert of DBRX's ``[E * F, D]``)."""
        count = self.shape[0] if self.shape and blocks is None else blocks
        if not self.shape or not 0 <= index < count or self.shape[0] % count:
            raise IndexError(f"{self.name}: index {index} outside {count} blocks of its first axis of {self.shape[:1]}")
        row = self.nbytes // count
        shape = self.shape[1:] if blocks is None else (self.shape[0] // count, *self.shape[1:])
        return StoredTensor(self.path, f"{self.name}[{index}]", self.dtype, shape, self.offset + index * row, row)


@dataclass(frozen=True)
class TransformedPiece:
    """A parameter's piece computed from stored tensors by a family's transform (read on demand)."""

    stored: StoredTensor
    placement: Placement
    companions: tuple[StoredTensor, ...] = ()

    @property
    def name(self) -> str:
        return self.stored.name

    @property
    def nbytes(self) -> int:
        return self.stored.nbytes + sum(c.nbytes for c in self.companions)

    def read(self) -> torch.Tensor:
        p = self.placement
        stored, companions = self.stored, self.companions
        if p.select is not None:  # read only that expert's bytes
            stored, companions = stored.select(p.select, p.blocks), tuple(c.select(p.select, p.blocks) for c in companions)
        return p.transform(stored.read(), *(c.read() for c in companions))


def read_safetensors_header(path: str | os.PathLike) -> list[StoredTensor]:
    """The tensors of one safetensors file (names, dtypes, shapes, byte ranges), without reading their data."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("shorter than its 8-byte header length")
            header_len = int.from_bytes(head, "little")
            if header_len > min(size - 8, 100 << 20):
                raise ValueError(f"header length {header_len} exceeds the file")
            header = json.loads(f.read(header_len))
        start = 8 + header_len
        tensors = []
        for name in sorted(k for k in header if k != "__metadata__"):
            info = header[name]
            begin, end = info["data_offsets"]
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise ValueError(f"tensor {name!r} has dtype {info['dtype']}, which moetrt does not read")
            if not 0 <= begin <= end or start + end > size:
                raise ValueError(f"tensor {name!r} lies outside the file (offsets {begin}..{end})")
            dtype, shape = _SAFETENSORS_DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"])
            nbytes = end - begin
            expected = torch.Size(shape).numel() * dtype.itemsize
            if nbytes != expected:
                raise ValueError(f"tensor {name!r} holds {nbytes} bytes, its shape {shape} needs {expected}")
            tensors.append(StoredTensor(path, name, dtype, shape, start + begin, nbytes))
        return tensors
    except (ValueError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}; the file is corrupt or truncated, re-download it") from exc


def _to_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """As loading into a float32 model and then ``.to(dtype)`` rounds: through float32."""
    if tensor.dtype == dtype:
        return tensor
    return tensor.to(torch.float32).to(dtype)


@dataclass(frozen=True)
class ParamSource:
    """Where one model parameter lies in a checkpoint: one stored tensor, or per-expert pieces.

    ``pieces`` are in memory order: their data, one after the other, is the parameter's data
    (``[E, 2F, D]``: expert 0 gate rows, expert 0 up rows, expert 1 gate rows, ...).
    """

    name: str  # model parameter name, e.g. layers.0.mlp.experts.gate_up_proj
    shape: tuple[int, ...]
    pieces: tuple[StoredTensor | TransformedPiece, ...]

    def chunks(self, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        """The pieces in memory order, each read and converted to ``dtype`` on its own."""
        for piece in self.pieces:
            yield _to_dtype(piece.read(), dtype)

    def read(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole parameter in ``dtype`` (one tensor of its size in memory)."""
        if len(self.pieces) == 1:
            return next(self.chunks(dtype)).reshape(self.shape)
        out = torch.empty(self.shape, dtype=dtype)
        flat, offset = out.view(-1), 0
        for chunk in self.chunks(dtype):
            flat[offset : offset + chunk.numel()] = chunk.reshape(-1)
            offset += chunk.numel()
            del chunk  # before the next one is read
        assert offset == out.numel(), (self.name, offset, out.numel())
        return out


def checkpoint_sources(folder: str | os.PathLike) -> tuple[MoEConfig, dict[str, ParamSource]]:
    """The config of a checkpoint folder and, per model parameter, where its data lies.

    Reads only config.json and the safetensors headers; accepts and rejects exactly the
    checkpoints :func:`from_pretrained` does. Tied ``lm_head.weight`` is not listed (it is
    ``embed_tokens.weight``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; point at a Hugging Face checkpoint folder")
    hf = _read_config_json(folder)
    cfg = config_from_hf(hf)
    with torch.device("meta"):
        model = MoETransformer(cfg)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    placer = _Placer(cfg, shapes, str(folder), FP8Scheme.from_hf(hf))
    stored_by_name: dict[str, StoredTensor] = {}
    placed: list[tuple[Placement, StoredTensor]] = []
    for path in _shard_files(folder):
        for stored in read_safetensors_header(path):
            stored_by_name[stored.name] = stored
            for p in placer.place(stored.name, stored.shape, stored.dtype) or ():
                placed.append((p, stored))
    placer.finish()
    whole: dict[str, StoredTensor | TransformedPiece] = {}
    parts: dict[tuple[str, int, str], StoredTensor | TransformedPiece] = {}
    for p, stored in placed:
        piece = stored if p.transform is None else TransformedPiece(
            stored, p, tuple(stored_by_name[n] for n in p.needs))
        if p.expert is None:
            key = p.key
            if cfg.tie_word_embeddings and key == "lm_head.weight":
                key = "embed_tokens.weight"  # one tensor under two names: the last one read wins
            whole[key] = piece
        else:
            for part in (p.part,) if p.part is not None else ("all",):
                parts[(p.key, p.expert, part)] = piece
    sources = {}
    for name, p in model.named_parameters():
        if _stacked(name):
            stacked = []
            for e in range(cfg.num_experts):
                if (name, e, "all") in parts:
                    stacked.append(parts[(name, e, "all")])
                else:
                    stacked += [parts.get((name, e, part)) for part in _expert_parts(name)]
            if all(stacked):
                sources[name] = ParamSource(name, tuple(p.shape), tuple(stacked))
                continue
        sources[name] = ParamSource(name, tuple(p.shape), (whole[name],))
    return cfg, sources


def _from_transformers(hf_model: Any, dtype: torch.dtype | None) -> MoETransformer:
    hf_cfg = hf_model.config.to_dict()
    cfg = config_from_hf(hf_cfg)
    model = _empty_model(cfg, dtype or torch.float32)
    state = hf_model.state_dict()
    load_state(model, iter(state.items()), f"transformers model {type(hf_model).__name__}", FP8Scheme.from_hf(hf_cfg))
    return model.eval()


def from_pretrained(
    source: str | os.PathLike | Any, dtype: torch.dtype | None = None, seed: int = 0
) -> MoETransformer:
    """Load a model in eval mode from a checkpoint folder, a preset name, or a transformers model.

    - a folder: Hugging Face ``config.json`` + ``*.safetensors`` (sharded index too) of a
      supported family (``moetrt.SUPPORTED_MODEL_TYPES``, one module each in ``moetrt/families``);
    - ``"tiny"``: the small trained model shipped with moetrt; any other preset name
      (``MoEConfig.from_name``) gives a randomly initialised model (seeded by ``seed``);
    - an in-memory ``transformers`` model of a supported family.

    ``dtype`` defaults to float32, the reference precision.
    """
    if not isinstance(source, (str, os.PathLike)):
        if hasattr(source, "config") and hasattr(source, "state_dict"):
            return _from_transformers(source, dtype)
        raise TypeError(
            f"from_pretrained takes a checkpoint folder, a preset name or a transformers model, got {type(source).__name__}"
        )
    folder = Path(source)
    name = preset_name(source)
    if name is not None or not folder.exists():
        name = str(source)
        if name in SHIPPED_PRESETS:
            folder = PRESET_DIR / name
        elif name in PRESETS:
            _check_preset_fits(name, dtype or torch.float32)
            warnings.warn(f"preset {name!r} ships no trained weights: initialised randomly with seed {seed}")
            model = MoETransformer.from_config(MoEConfig.from_name(name), seed=seed).to(dtype or torch.float32)
            model.source = name if seed == 0 else None  # what from_pretrained(source) rebuilds exactly
            return model
        else:
            raise _unknown_source(name)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; point at a Hugging Face checkpoint folder")
    hf = _read_config_json(folder)
    cfg = config_from_hf(hf)
    model = _empty_model(cfg, dtype or torch.float32)
    load_state(model, iter_safetensors(folder), str(folder), FP8Scheme.from_hf(hf))
    model.source_dir = folder  # where tokenizer files may be found
    model.source = str(source) if str(source) in SHIPPED_PRESETS else str(folder.resolve())
    return model.eval()


def _check_preset_fits(name: str, dtype: torch.dtype) -> None:
    """Refuse a random preset model larger than the memory here, before allocating it."""
    available = _available_memory()
    need = preset_parameters(name) * torch.empty((), dtype=dtype).element_size()
    if available is not None and need > available:
        raise MoetrtError(
            f"preset {name!r} is a randomly initialised model of {need / 1e9:.1f} GB ({dtype}), more than the "
            f"{available / 1e9:.1f} GB of memory available here; its real checkpoint folder is exported without "
            "loading it (moetrt export <checkpoint folder>), and 'tiny' runs anywhere"
        )


# --- writing -----------------------------------------------------------------------------------
def save_pretrained(model: MoETransformer, folder: str | os.PathLike, extra_files: dict[str, str] | None = None) -> Path:
    """Write ``model`` as a Hugging Face checkpoint folder (config.json + model.safetensors).

    ``extra_files`` maps file names to text (a tokenizer.json, say). The folder must not exist.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    hf = hf_config_from_config(model.config)
    if folder.exists():
        raise CheckpointError(f"{folder} already exists; choose a new folder (moetrt never overwrites a checkpoint)")
    tmp = folder.with_name(folder.name + ".partial")
    if tmp.exists():
        raise CheckpointError(f"{tmp} exists (left by an interrupted save?); remove it and retry")
    tmp.mkdir(parents=True)
    try:
        tensors = {name: t.detach().contiguous().clone() for name, t in families.get(model.config.model_type).hf_tensors(model)}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp / "model.safetensors", 0o666 & ~umask)  # safetensors writes it private
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        tmp.rename(folder)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
