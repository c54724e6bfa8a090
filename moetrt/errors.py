"""Error types.

``MoetrtError`` is what the user can fix (a wrong path, an unsupported model, a shape
mismatch); its message says what is wrong and how to fix it, and the CLI prints it without a
traceback. Internal invariants use ``assert``: a failed assert is our bug, not the user's.
"""

from __future__ import annotations

__all__ = ["MoetrtError", "UnsupportedModelError", "CheckpointError", "BackendMissingError", "CHECK_FAILED"]

#: exit code of a check that ran and found a difference (``moetrt parity`` / ``demo`` FAIL), told
#: apart from a crash (1), an input to fix (2) and a missing back end (3)
CHECK_FAILED = 4


class MoetrtError(Exception):
    """A problem the user can fix; the message says how."""

    #: exit code of the CLI for this kind of error (2: usage / input error)
    exit_code = 2

    def __init__(self, *args, cli: str | None = None):
        super().__init__(*args)
        #: the same message in the command line's words (its flags, not the API's argument names);
        #: None when the message names neither
        self.cli_message = cli

    def for_cli(self) -> str:
        return self.cli_message or str(self)


class UnsupportedModelError(MoetrtError):
    """The model (architecture, option, dtype) is not one moetrt supports."""


class CheckpointError(MoetrtError):
    """A checkpoint folder is missing files, has missing/extra/misshaped tensors, or is corrupt."""


class BackendMissingError(MoetrtError):
    """An optional back end (onnxruntime, tensorrt, triton, polygraphy) is not installed."""

    exit_code = 3
