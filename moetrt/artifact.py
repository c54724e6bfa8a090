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
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from moetrt.errors import CheckpointError, MoetrtError

__all__ = [
    "METADATA_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "atomic_output_dir",
    "check_output_dir",
    "check_artifact_files",
    "sha256_file",
    "package_versions",
    "read_metadata",
    "write_metadata",
    "write_artifact",
    "Progress",
]

METADATA_FILE = "moetrt.json"
# the exported / optimized ONNX folder written by the export and optimize stages
FORMAT, FORMAT_VERSION = "moetrt-onnx", 1


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Fail early (before any heavy work) if ``out_dir`` cannot be written."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        pass  # an empty folder (made by the user for the output): nothing in it to lose
    elif out_dir.exists():
        artifact = out_dir.is_dir() and (out_dir / METADATA_FILE).exists()
        if not overwrite:
            message = f"{out_dir} already exists; choose another folder"
            raise MoetrtError(message + (" or pass overwrite=True" if artifact else ""),
                              cli=message + (" or pass --overwrite" if artifact else ""))
        if not artifact:
            raise MoetrtError(
                f"{out_dir} exists and is not a moetrt artifact folder (no {METADATA_FILE}); "
                "moetrt only replaces its own artifacts: choose another folder"
            )
        try:
            listed = set(json.loads((out_dir / METADATA_FILE).read_text()).get("files") or {})
        except (OSError, ValueError, AttributeError):
            listed = set()  # unreadable metadata: every other file counts as the user's
        extra = sorted(p.name for p in out_dir.iterdir() if p.name != METADATA_FILE and p.name not in listed)
        if extra:
            shown = ", ".join(extra[:5]) + (", ..." if len(extra) > 5 else "")
            raise MoetrtError(
                f"{out_dir} holds files moetrt did not write ({shown}); --overwrite would delete them: "
                "move them out or choose another folder"
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
            try:
                tmp.rename(out_dir)
            except BaseException:
                backup.rename(out_dir)  # put the previous artifact back
                raise
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


def write_artifact(
    folder: Path,
    meta: dict[str, Any],
    tokenizer_from: str | os.PathLike | None = None,
    tokenizer_files: Iterable[str] = (),
    genai: bool = False,
) -> dict[str, Any]:
    """Finish the artifact being written into ``folder`` (the temporary of :func:`atomic_output_dir`).

    Copies those of ``tokenizer_files`` that exist in ``tokenizer_from``, takes the sha256 of every
    file in ``folder``, and writes ``moetrt.json``: ``meta`` with ``tokenizer_files`` (the names
    copied) and ``files`` (name -> sha256) set. Every stage (export, optimize, engine build) saves
    its folder through this one function. Returns the metadata written.

    ``genai``: an ONNX folder that onnxruntime-genai can run gets its ``genai_config.json``
    (:mod:`moetrt.genai`), and ``meta["genai"]`` says whether it was written, or why not.
    """
    copied = []
    if tokenizer_from is not None:
        for name in tokenizer_files:
            if (Path(tokenizer_from) / name).exists():
                shutil.copy2(Path(tokenizer_from) / name, folder / name)
                copied.append(name)
    if genai:
        from moetrt.genai import write_genai_config

        meta = {**meta, "genai": write_genai_config(folder, meta)}
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != METADATA_FILE}
    written = {**meta, "tokenizer_files": copied, "files": files}
    write_metadata(folder, written)
    return written


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
        self._last_update = 0.0

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        index = self.stages.index(name) + 1
        start = time.perf_counter()
        if self.enabled:
            print(f"[{index}/{len(self.stages)}] {name}{': ' + detail if detail else ''} ...", file=sys.stderr, flush=True)
        yield
        if self.enabled:
            print(f"      {name} done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    def update(self, done: float, total: float, detail: str = "", force: bool = False, every: float = 10.0) -> None:
        """Progress inside the running stage: ``done`` of ``total`` bytes, printed at most every ``every`` seconds."""
        now = time.perf_counter()
        if not self.enabled or (not force and now - self._last_update < every):
            return
        self._last_update = now
        percent = 100.0 * done / total if total else 100.0
        print(f"      {done / 2**30:.2f} / {total / 2**30:.2f} GiB ({percent:.0f}%){', ' + detail if detail else ''}",
              file=sys.stderr, flush=True)

    def done(self, message: str) -> None:
        if self.enabled:
            print(f"{message} (total {time.perf_counter() - self._t0:.1f} s)", file=sys.stderr, flush=True)


def check_artifact_files(
    folder: str | os.PathLike,
    meta: dict[str, Any] | None = None,
    checksums: bool = True,
    required: tuple[str, ...] = (),
    model_only: bool = False,
) -> None:
    """Raise a :class:`CheckpointError` naming the files of an artifact folder that are missing, or
    (with ``checksums``) that changed since they were written; ``meta`` is its ``moetrt.json``.
    ``model_only`` looks at the model's own files (``model.*``) only, not the tokenizer's.

    Without ``checksums`` it only looks at which files exist, which costs nothing; the checksums
    read every byte, so callers run them when something already failed, to say why.
    """
    folder = Path(folder)
    meta = read_metadata(folder) if meta is None else meta
    listed: dict[str, str] = meta.get("files") or {}
    if model_only:
        listed = {name: digest for name, digest in listed.items() if name.startswith("model.")}
    missing = sorted(name for name in {*required, *listed} if not (folder / name).exists())
    if missing:
        raise CheckpointError(
            f"{folder} is missing {', '.join(missing)} (listed in {METADATA_FILE}); the folder is incomplete: "
            "copy the whole folder or re-export the model"
        )
    if not checksums:
        return
    for name, expected in listed.items():
        path = folder / name
        if sha256_file(path) != expected:
            size = path.stat().st_size
            raise CheckpointError(
                f"{path} ({size} bytes) does not match the checksum in {METADATA_FILE}; the file was changed or "
                "truncated after it was written (an interrupted copy or a full disk?): copy it again or re-export "
                "the model"
            )
