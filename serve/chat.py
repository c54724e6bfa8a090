"""A checkpoint's chat template: the Jinja template in ``tokenizer_config.json`` (``chat_template``)
or ``chat_template.jinja``, rendered as transformers' ``apply_chat_template(..., add_generation_prompt=True)`` renders it:
sandboxed Jinja with ``loopcontrols``, ``raise_exception``, ``strftime_now``, transformers' ``tojson``
filter, and the tokenizer's special tokens as variables.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from moetrt.errors import BackendMissingError, CheckpointError, MoetrtError

__all__ = ["ChatTemplate"]

CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str]):
        self.source, self.special_tokens = source, special_tokens
        try:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as exc:
            raise BackendMissingError("chat templates need jinja2: pip install 'moetrt[serve]'") from exc

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            # transformers' filter: Jinja's own escapes HTML characters
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template = env.from_string(source)
        self._error = TemplateError

    @classmethod
    def from_folder(cls, folder: str | os.PathLike | None) -> ChatTemplate | None:
        """The folder's chat template, or ``None`` when it has none."""
        if folder is None:
            return None
        folder = Path(folder)
        config: dict[str, Any] = {}
        if (folder / CONFIG_FILE).exists():
            try:
                config = json.loads((folder / CONFIG_FILE).read_text())
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"{folder / CONFIG_FILE} is not valid JSON ({exc}); fix or delete the file") from exc
        source = config.get("chat_template")
        if (folder / TEMPLATE_FILE).exists():
            source = (folder / TEMPLATE_FILE).read_text()
        if isinstance(source, list):  # named templates: the default one
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        if not isinstance(source, str) or not source:
            return None
        special = {name: _token_text(config.get(name)) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
        return cls(source, {k: v for k, v in special.items() if v is not None})

    def render(self, messages: list[dict[str, Any]]) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=True, **self.special_tokens)
        except self._error as exc:
            raise MoetrtError(f"the model's chat template refused these messages: {exc}") from exc


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # an AddedToken written out
        return value.get("content")
    return value if isinstance(value, str) else None
