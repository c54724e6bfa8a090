"""Text in, text out: the model folder's own tokenizer (``tokenizer.json`` through the ``tokenizers``
library) and its ``generation_config.json`` (stop tokens). moetrt writes no tokenizer of its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from moetrt.errors import BackendMissingError, CheckpointError

__all__ = ["Tokenizer", "IncrementalDecoder", "read_generation_config", "token_id_list"]

TOKENIZER_FILE = "tokenizer.json"
GENERATION_CONFIG_FILE = "generation_config.json"


def token_id_list(value: Any) -> list[int]:
    """``None`` | int | list of ints (as config files spell token ids) -> list of ints."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def read_generation_config(folder: str | os.PathLike | None) -> dict[str, Any]:
    """The folder's ``generation_config.json`` as a dict ({} when there is none)."""
    if folder is None:
        return {}
    path = Path(folder) / GENERATION_CONFIG_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); fix or delete the file") from exc


class Tokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer.from_file(<folder>/tokenizer.json)``."""

    def __init__(self, path: str | os.PathLike):
        try:
            import tokenizers
        except ImportError as exc:
            raise BackendMissingError(
                f"{path} needs the `tokenizers` package for text in/out: pip install tokenizers "
                "(or pass token ids instead of text)"
            ) from exc
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
            raise CheckpointError(f"cannot read tokenizer {path}: {exc}; the file is corrupt or of another format") from exc
        self.path = Path(path)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike | None) -> Tokenizer | None:
        """The folder's tokenizer, or ``None`` when it has no ``tokenizer.json``."""
        if folder is None or not (Path(folder) / TOKENIZER_FILE).exists():
            return None
        return cls(Path(folder) / TOKENIZER_FILE)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text).ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces as they become printable.

    Decodes the whole list each time and emits the new suffix; holds back while the text ends
    in U+FFFD (a multi-byte character split across tokens).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece = text[len(self.text) :] if text.startswith(self.text) else text[_common_prefix(text, self.text) :]
        self.text = text
        return piece

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end)."""
        text = self.tokenizer.decode(self.ids)
        piece = text[len(self.text) :] if text.startswith(self.text) else ""
        self.text = text
        return piece


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
