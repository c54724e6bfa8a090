"""The same HTTP app on Ray Serve: N replicas of the model, each a Session with its own batching engine.

Two Serve applications::

    moetrt-model      ModelReplica x N    Session(source) + BatchEngine; ``generate`` streams TokenEvents
    moetrt            Frontend x 1        the OpenAI app (moetrt.serve.app) behind Ray's HTTP proxy,
                                          sending each request to a replica through a DeploymentHandle

Serve routes each request to a replica and batches nothing itself: the replica's
:class:`~moetrt.serve.engine.BatchEngine` joins the requests it holds into shared decode steps
(``max_ongoing_requests`` is set to ``max_batch`` so that Serve sends each replica as many as it
can batch). Ray Serve replaces a replica whose process died, but does not retry the requests that
were on it; the front end does, for a request that had not streamed a token yet: it is sent
again (to another replica) up to ``retries`` times, so a replica crash costs those requests
latency, not errors. A request that had streamed tokens ends with an error (its client has
already seen part of the answer).

``autoscaling`` is Ray Serve's ``autoscaling_config`` (``min_replicas``, ``max_replicas``,
``target_ongoing_requests``, ...), passed through as is.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from typing import Any

from moetrt.errors import BackendMissingError, MoetrtError

__all__ = ["deploy", "serve_on_ray", "MODEL_APP", "FRONTEND_APP", "replica_failures"]

MODEL_APP, FRONTEND_APP = "moetrt-model", "moetrt"
DEFAULT_RETRIES = 3


def _ray_serve() -> Any:
    try:
        from ray import serve
    except ImportError as exc:
        raise BackendMissingError("--replicas needs Ray Serve: pip install 'moetrt[serve]' (or 'ray[serve]')") from exc
    return serve


def replica_failures() -> tuple[type[BaseException], ...]:
    """The errors that mean a replica (or its node) went away, rather than the request being bad."""
    from ray import exceptions

    kinds = [exceptions.RayActorError, exceptions.WorkerCrashedError, exceptions.NodeDiedError,
             exceptions.ActorUnavailableError]
    return tuple(k for k in kinds if isinstance(k, type))


class ModelReplica:
    """One replica: a Session and its batching engine (``generate`` is a streaming method)."""

    def __init__(self, source: str, backend: str, device: str | None, max_batch: int):
        from moetrt.runtime import Session
        from moetrt.serve.app import LocalGenerator
        from moetrt.serve.engine import BatchEngine

        self.session = Session(source, backend=backend, device=device)
        self.local = LocalGenerator(BatchEngine(self.session, max_batch=max_batch))

    def info(self) -> dict[str, Any]:
        session = self.session
        return {"folder": str(session.folder) if session.folder else None, "stop_tokens": list(session.stop_tokens),
                "max_positions": session.spec.max_positions, "vocab_size": session.spec.vocab_size}

    def where(self) -> tuple[int, str]:
        """(process id, Ray node id) of this replica."""
        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id()

    async def generate(self, params: Any) -> AsyncIterator[Any]:
        async for event in self.local.events(params):  # what the one-process server gets from its engine
            yield event

    def __del__(self) -> None:
        local = getattr(self, "local", None)
        if local is not None:
            local.engine.close(timeout=1)


class RayGenerator:
    """Requests go to the model application's replicas; retried while no token was streamed."""

    def __init__(self, handle: Any, retries: int = DEFAULT_RETRIES):
        self.handle, self.retries = handle.options(stream=True, method_name="generate"), retries
        self.retried = 0  # requests sent again after a replica failure (for tests and logs)

    async def events(self, params: Any) -> AsyncIterator[Any]:
        failures = replica_failures()
        for attempt in range(self.retries + 1):
            started = False
            stream = self.handle.remote(params)
            try:
                async for event in stream:
                    started = True
                    yield event
                return
            except failures as exc:
                if started or attempt == self.retries:
                    from moetrt.serve.app import ApiError

                    what = "after it had started streaming" if started else f"{attempt + 1} times"
                    raise ApiError(503, f"the model replica serving this request failed {what} ({type(exc).__name__}); "
                                        "retry the request", code="replica_failed") from exc
                self.retried += 1
            except BaseException:
                stream.cancel()
                raise

    def close(self) -> None:
        """Nothing to release here: Ray Serve owns the replicas and their Sessions (``serve.shutdown`` ends them)."""


class Frontend:
    """The OpenAI app; its model side is :class:`RayGenerator` over the model application."""

    def __init__(self, name: str, info: dict[str, Any], api_key: str | None, request_timeout: float, retries: int):
        from moetrt.runtime.text import Tokenizer
        from moetrt.serve.app import ModelInfo
        from moetrt.serve.chat import ChatTemplate

        serve = _ray_serve()
        self.generator = RayGenerator(serve.get_deployment_handle("ModelReplica", app_name=MODEL_APP), retries)
        self.info = ModelInfo(name=name, tokenizer=Tokenizer.from_folder(info["folder"]),
                              chat_template=ChatTemplate.from_folder(info["folder"]),
                              stop_tokens=tuple(info["stop_tokens"]), max_positions=info["max_positions"],
                              vocab_size=info["vocab_size"])
        self.api_key, self.request_timeout = api_key, request_timeout

    def __serve_build_asgi_app__(self) -> Any:
        from moetrt.serve.app import create_app

        return create_app(self.info, self.generator, api_key=self.api_key, request_timeout=self.request_timeout)


def deploy(
    source: str | os.PathLike,
    backend: str = "torch",
    device: str | None = None,
    model_name: str | None = None,
    api_key: str | None = None,
    max_batch: int = 16,
    request_timeout: float = 600.0,
    replicas: int = 1,
    autoscaling: dict[str, Any] | None = None,
    replica_cpus: float | None = None,
    retries: int = DEFAULT_RETRIES,
    host: str = "127.0.0.1",
    port: int = 8000,
    frontend_resources: dict[str, float] | None = None,
) -> Any:
    """Deploy the model and the front end on the Ray cluster this process is connected to
    (``ray.init`` first, or Serve starts a local one); returns the model application's handle.

    The HTTP API is then at ``http://host:port/v1`` (Ray Serve's proxy on the head node).
    ``frontend_resources`` are Ray custom resources the front end needs (to pin it to a node).
    """
    from moetrt.serve.server import model_name_of

    serve = _ray_serve()
    if replicas < 1:
        raise MoetrtError(f"replicas must be >= 1, got {replicas}")
    source = _absolute(source)
    options: dict[str, Any] = {
        "max_ongoing_requests": max_batch,
        "ray_actor_options": {"num_cpus": 1.0 if replica_cpus is None else replica_cpus},
        "health_check_period_s": 2,
        "graceful_shutdown_timeout_s": 5,
    }
    if autoscaling is not None:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = replicas
    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
    model = serve.deployment(ModelReplica, name="ModelReplica").options(**options)
    handle = serve.run(model.bind(source, backend, device, max_batch), name=MODEL_APP, route_prefix=None)
    info = handle.info.remote().result()
    frontend = serve.deployment(serve.ingress()(Frontend), name="Frontend").options(
        num_replicas=1, ray_actor_options={"num_cpus": 0, "resources": dict(frontend_resources or {})},
        max_ongoing_requests=10_000)
    serve.run(frontend.bind(model_name or model_name_of(source), info, api_key, request_timeout, retries),
              name=FRONTEND_APP, route_prefix="/")
    return handle


def _absolute(source: str | os.PathLike) -> str:
    """A folder as an absolute path (replicas may start in another working directory); a preset name as is."""
    from pathlib import Path

    path = Path(source)
    return str(path.resolve()) if path.exists() else str(source)


def serve_on_ray(source: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, ray_address: str | None = None,
               **options: Any) -> None:
    """Connect to (or start) Ray, deploy, and serve until interrupted; shuts the applications down after."""
    import ray

    serve = _ray_serve()
    ray.init(address=ray_address, include_dashboard=False, logging_level="WARNING")
    try:
        deploy(source, host=host, port=port, **options)
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        ray.shutdown()
