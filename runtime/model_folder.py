"""What a model source is (exported folder, checkpoint folder, preset) and what an exported folder holds.

An exported folder (DESIGN.md) holds ``model.onnx`` (+ ``model.onnx.data``), ``moetrt.json`` and
the tokenizer files of its source. ``moetrt.json``::

    {"format": "moetrt-onnx", "format_version": 1, "config": {...MoEConfig...},
     "export": {"dtype": "fp32"|"fp16"|"bf16", "opset": int, "router_outputs": bool, "target": ...},
     "io": {"inputs": [...], "outputs": [...], "state": {...moetrt.state...}}, "source": str | null, "versions": {...},
     "files": {"model.onnx": "<sha256>", ...}}
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moetrt.artifact import FORMAT, FORMAT_VERSION, METADATA_FILE, check_artifact_files, read_metadata
from moetrt.config import PRESETS, MoEConfig
from moetrt.dtypes import DTYPES
from moetrt.errors import CheckpointError, MoetrtError
from moetrt.state import StateContract

__all__ = [
    "ExportedModel", "read_exported", "source_kind", "default_backend", "check_artifact_files", "explain_broken_artifact",
    "FORMAT", "FORMAT_VERSION", "METADATA_FILE",
]

def source_kind(source: str | os.PathLike) -> str:
    """``"exported"`` (a folder with moetrt.json), ``"checkpoint"`` (a folder with config.json) or ``"preset"``."""
    from moetrt.checkpoint import preset_name

    if preset_name(source, warn=False) is not None:  # a bare preset name is the preset, whatever folders exist
        return "preset"
    path = Path(source)
    if path.is_dir():
        if (path / METADATA_FILE).exists():
            return "exported"
        if (path / "config.json").exists():
            return "checkpoint"
        if (path / "model.onnx").exists():
            raise CheckpointError(
                f"{path} has model.onnx but no {METADATA_FILE}; moetrt needs the folder written by "
                "`moetrt export` (re-export it, or copy moetrt.json beside model.onnx)"
            )
        raise CheckpointError(
            f"{path} is neither an exported model (no {METADATA_FILE}) nor a Hugging Face checkpoint "
            "(no config.json); point at the folder `moetrt export` wrote or at a checkpoint folder"
        )
    if path.exists():
        raise CheckpointError(f"{path} is a file; point at a model folder (or give a preset name)")
    if str(source) in PRESETS:
        return "preset"
    from moetrt.checkpoint import _unknown_source

    raise _unknown_source(str(source))


def default_backend(source: Any) -> str:
    """The back end that runs ``source`` as it is: ``"ort"`` for an exported (or optimized) ONNX
    folder, ``"trt"`` for a TensorRT engine folder, ``"torch"`` for a checkpoint, a preset or a model object.
    """
    if not isinstance(source, (str, os.PathLike)) or source_kind(source) != "exported":
        return "torch"
    from moetrt.ops.plugins import ENGINE_FORMAT

    return "trt" if read_metadata(Path(source)).get("format") == ENGINE_FORMAT else "ort"


@dataclass
class ExportedModel:
    """The parsed ``moetrt.json`` of an exported folder."""

    folder: Path
    config: MoEConfig
    dtype: str  # "fp32" | "fp16" | "bf16"
    router_outputs: bool
    source: str | None  # the checkpoint folder or preset it was exported from
    meta: dict[str, Any] = field(repr=False)

    @property
    def onnx_path(self) -> Path:
        return self.folder / "model.onnx"

    @property
    def state(self) -> StateContract:
        """What each layer carries between steps (``io.state``; key/value for folders written before it)."""
        return StateContract.read(self.meta, self.config)

    def verify_checksums(self) -> None:
        """Recompute the sha256 of every file listed in ``moetrt.json``; raise on a mismatch."""
        check_artifact_files(self.folder, self.meta, checksums=True)


def read_exported(folder: str | os.PathLike) -> ExportedModel:
    """Read and check an exported folder's ``moetrt.json``; every file it lists must be present."""
    folder = Path(folder)
    meta_path = folder / METADATA_FILE
    meta = read_metadata(folder)
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{meta_path} describes a {meta.get('format')!r} artifact; this back end runs {FORMAT!r} folders "
            "(written by `moetrt export`)"
        )
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path} has format_version {version!r}; this moetrt reads version {FORMAT_VERSION}: "
            "re-export the model with this moetrt, or install the moetrt that wrote it"
        )
    try:
        config = MoEConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{meta_path} holds no valid model config ({exc}); re-export the model") from exc
    export = meta.get("export") or {}
    dtype = export.get("dtype", "fp32")
    if dtype not in DTYPES:
        raise CheckpointError(f"{meta_path}: export.dtype {dtype!r} is not one of {DTYPES}; re-export the model")
    read_state(meta, config, meta_path)
    check_artifact_files(folder, meta, checksums=False, required=("model.onnx",))
    return ExportedModel(
        folder=folder,
        config=config,
        dtype=dtype,
        router_outputs=bool(export.get("router_outputs", False)),
        source=meta.get("source"),
        meta=meta,
    )


def read_state(meta: dict[str, Any], config: MoEConfig, meta_path: Path) -> StateContract:
    """The per-layer state recorded in ``meta`` (key/value when it predates ``io.state``), checked against ``config``."""
    try:
        state = StateContract.read(meta, config)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{meta_path}: io.state is not a valid state contract ({exc}); re-export the model") from exc
    if state.num_layers != config.num_hidden_layers:
        raise CheckpointError(
            f"{meta_path}: io.state describes {state.num_layers} layers, the config {config.num_hidden_layers}; "
            "re-export the model"
        )
    return state


def explain_broken_artifact(path: str | os.PathLike, error: BaseException) -> None:
    """After ``error`` was raised while reading the artifact at ``path``: raise a :class:`CheckpointError`
    naming what is wrong with the artifact (a missing, changed or unparsable file), chained to ``error``;
    return quietly when the artifact looks intact (then ``error`` is not the artifact's fault).
    """
    path = Path(path)
    if path.is_dir() and (path / METADATA_FILE).exists():
        try:
            check_artifact_files(path, checksums=True, required=("model.onnx",) if (path / "model.onnx").exists() else ())
        except CheckpointError as exc:
            raise exc from error
        except MoetrtError:  # an unreadable moetrt.json: read_metadata's message says so
            raise
        onnx_file = path / "model.onnx"
    else:
        onnx_file = path
    if onnx_file.suffix == ".onnx" and onnx_file.is_file() and type(error).__name__ == "DecodeError":
        raise CheckpointError(
            f"{onnx_file} is not a readable ONNX model ({' '.join(str(error).split())}); the file is corrupt or "
            "truncated: copy it again or re-export the model"
        ) from error
