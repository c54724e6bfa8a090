"""Artifact folders shared by every stage: atomic writes, checksums, the ``moetrt.json`` metadata.

A stage writes into a temporary sibling folder and renames it into place only when everything
is written, so a failed or interrupted run leaves no half-written folder, and an existing
artifact stays intact until its replacement is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moetrt.errors import MoetrtError

__all__ = [
    "METADATA_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "atomic_output_dir",
    "check_output_dir",
    "sha256_file",
    "package_versions",
    "read_metadata",
    "write_metadata",
    "Progress",
]

METADATA_FILE = "moetrt.json"
# the exported / optimized ONNX folder written by the export and optimize stages
FORMAT, FORMAT_VERSION = "moetrt-onnx", 1


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Fail early (before any heavy work) if ``out_dir`` cannot be written."""
    if out_dir.exists():
        if not overwrite:
            raise MoetrtError(f"{out_dir} already exists; choose another folder or pass overwrite=True (--overwrite)")
        if not out_dir.is_dir() or not (out_dir / METADATA_FILE).exists():
            raise MoetrtError(
                f"{out_dir} exists and is not a moetrt artifact folder (no {METADATA_FILE}); "
                "moetrt only replaces its own artifacts: choose another folder"
            )
    parent = out_dir.parent if str(out_dir.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise MoetrtError(f"cannot write into {parent}: permission denied")


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes ``out_dir``, on failure it is removed."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the artifact gets the usual mode
    try:
        yield tmp
        if out_dir.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            backup.rmdir()
            out_dir.rename(backup)
            tmp.rename(out_dir)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def package_versions(*names: str) -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in names or ("moetrt", "torch", "onnx", "onnxscript", "onnx-ir", "onnxruntime", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_metadata(folder: Path, meta: dict[str, Any]) -> None:
    (folder / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")


def read_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """``moetrt.json`` of an artifact folder, with errors that say what is wrong."""
    folder = Path(folder)
    path = folder / METADATA_FILE
    if not folder.is_dir():
        raise MoetrtError(f"{folder} is not a folder; pass the folder written by `moetrt export`")
    if not path.exists():
        raise MoetrtError(f"{folder} has no {METADATA_FILE}; is it a folder written by `moetrt export`?")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MoetrtError(f"{path} is corrupt ({exc}); re-export the model") from exc
    if not str(meta.get("format", "")).startswith("moetrt-"):
        raise MoetrtError(f"{path} describes an unknown format {meta.get('format')!r}; re-export with this moetrt")
    return meta


class Progress:
    """Stage-by-stage progress on stderr: ``[2/4] trace ... done in 3.1 s``."""

    def __init__(self, stages: list[str], enabled: bool = True, title: str = ""):
        self.stages, self.enabled, self.title = stages, enabled, title
        self._t0 = time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        index = self.stages.index(name) + 1
        start = time.perf_counter()
        if self.enabled:
            print(f"[{index}/{len(self.stages)}] {name}{': ' + detail if detail else ''} ...", file=sys.stderr, flush=True)
        yield
        if self.enabled:
            print(f"      {name} done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    def done(self, message: str) -> None:
        if self.enabled:
            print(f"{message} (total {time.perf_counter() - self._t0:.1f} s)", file=sys.stderr, flush=True)
