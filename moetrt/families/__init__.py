"""Model families: one module per Hugging Face ``model_type``, registered by that name.

``get("mixtral")`` returns the family; an unknown type raises ``UnsupportedModelError`` listing
the supported ones. To add a family, write ``moetrt/families/<model_type>.py`` with a
:class:`~moetrt.families._base.Family` subclass decorated with :func:`register`, and import it
below (README: "Adding a model family").
"""

from __future__ import annotations

from moetrt.errors import UnsupportedModelError

from ._base import COMPANION, DERIVED, SKIPPED, Family, Placement

__all__ = ["Family", "Placement", "DERIVED", "COMPANION", "SKIPPED", "register", "get", "SUPPORTED_MODEL_TYPES", "tiny_variants",
           "refuse"]

_REGISTRY: dict[str, Family] = {}
# model types moetrt knows and refuses, with the reason (a family module declares them with refuse())
_REFUSED: dict[str, str] = {}


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: register one instance of ``cls`` under its ``model_type``."""
    if not getattr(cls, "model_type", None) or cls.model_type in _REGISTRY:
        raise ValueError(f"family {cls.__name__} needs a model_type not yet registered, got {cls.__dict__.get('model_type')!r}")
    _REGISTRY[cls.model_type] = cls()
    return cls


def refuse(model_type: str, reason: str) -> None:
    """Declare a ``model_type`` moetrt knows and does not read: :func:`get` raises with ``reason``."""
    if model_type in _REGISTRY or model_type in _REFUSED:
        raise ValueError(f"model_type {model_type!r} is already registered or refused")
    _REFUSED[model_type] = reason


def supported_message() -> str:
    return "supported model_type values: " + ", ".join(_REGISTRY)


def get(model_type: str | None) -> Family:
    """The family registered for ``model_type``."""
    if model_type in _REFUSED:
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported: {_REFUSED[model_type]}; "
                                    f"{supported_message()}")
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported; {supported_message()}") from None


def tiny_variants() -> dict[str, tuple[str, dict]]:
    """Every family's tiny test configs: variant name -> (model_type, overrides of ``Family.tiny_config``)."""
    return {name: (family.model_type, overrides)
            for family in _REGISTRY.values() for name, overrides in family.tiny_variants.items()}


# the families, in the order they are listed to users
from . import mixtral, qwen2_moe, qwen3_moe, olmoe, gpt_oss, deepseek_v3, glm4_moe, minimax_m2  # noqa: E402,F401
from . import qwen3_next, qwen3_5_moe  # noqa: E402,F401
from . import gemma4  # noqa: E402,F401
from . import ernie4_5_moe  # noqa: E402,F401
from . import granitemoe  # noqa: E402,F401
from . import dbrx  # noqa: E402,F401
from . import llama4  # noqa: E402,F401
from . import phimoe  # noqa: E402,F401

SUPPORTED_MODEL_TYPES = tuple(_REGISTRY)
