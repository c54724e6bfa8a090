"""``serve``: the OpenAI-compatible app for a model source, run under uvicorn (one process) or on Ray Serve.

    from moetrt.serve import serve
    serve("exported/tiny", backend="ort", port=8000)                  # one process, batching requests
    serve("exported/tiny", backend="ort", replicas=2)                  # Ray Serve replicas (a local Ray)
    serve("exported/tiny", replicas=4, ray_address="ray://head:10001")  # an existing Ray cluster
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from moetrt.errors import BackendMissingError, MoetrtError

__all__ = ["serve", "app_from_source", "model_name_of", "DEFAULT_HOST", "DEFAULT_PORT"]

DEFAULT_HOST = "127.0.0.1"  # reachable from this machine only unless told otherwise
DEFAULT_PORT = 8000


def model_name_of(source: str | os.PathLike) -> str:
    """The name clients use in ``model``: the preset name or the folder's name."""
    return Path(source).name or str(source)


def app_from_source(
    source: str | os.PathLike,
    backend: str = "torch",
    device: str | None = None,
    model_name: str | None = None,
    api_key: str | None = None,
    max_batch: int = 16,
    request_timeout: float = 600.0,
) -> Any:
    """The FastAPI app serving ``source`` from one :class:`Session` in this process."""
    from moetrt.runtime import Session
    from moetrt.serve.app import LocalGenerator, ModelInfo, create_app
    from moetrt.serve.engine import BatchEngine

    _check_options(max_batch, request_timeout)
    session = Session(source, backend=backend, device=device)
    info = ModelInfo.from_session(session, model_name or model_name_of(source))
    return create_app(info, LocalGenerator(BatchEngine(session, max_batch=max_batch)), api_key=api_key, request_timeout=request_timeout)


def serve(
    source: str | os.PathLike,
    backend: str = "torch",
    device: str | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    model_name: str | None = None,
    api_key: str | None = None,
    max_batch: int = 16,
    request_timeout: float = 600.0,
    replicas: int | None = None,
    ray_address: str | None = None,
    autoscaling: dict[str, Any] | None = None,
    replica_cpus: float | None = None,
) -> None:
    """Serve ``source`` over HTTP until interrupted.

    ``replicas=None`` runs the model in this process; ``replicas=N`` (or ``autoscaling``, Ray
    Serve's ``autoscaling_config``) deploys N Ray Serve replicas of it, each with its own
    Session, behind Ray Serve's HTTP proxy (:mod:`moetrt.serve.replicas`).
    """
    _check_options(max_batch, request_timeout)
    if replicas is None and autoscaling is None and ray_address is None:
        uvicorn = _import("uvicorn")
        app = app_from_source(source, backend, device, model_name, api_key, max_batch, request_timeout)
        uvicorn.run(app, host=host, port=port, log_level="warning")
        return
    from moetrt.serve.replicas import serve_on_ray

    serve_on_ray(source, host=host, port=port, ray_address=ray_address, backend=backend, device=device,
                 model_name=model_name, api_key=api_key, max_batch=max_batch, request_timeout=request_timeout,
                 replicas=replicas or 1, autoscaling=autoscaling, replica_cpus=replica_cpus)


def _check_options(max_batch: int, request_timeout: float) -> None:
    if max_batch < 1:
        raise MoetrtError(f"max_batch must be >= 1, got {max_batch}")
    if not request_timeout > 0:
        raise MoetrtError(f"request_timeout must be > 0 seconds, got {request_timeout}")


def _import(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise BackendMissingError(f"serving needs {name}: pip install 'moetrt[serve]'") from exc
