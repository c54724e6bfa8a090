"""Serving: an OpenAI-compatible HTTP server over a :class:`moetrt.runtime.Session`.

    moetrt serve exported/tiny --backend ort                # one process on 127.0.0.1:8000
    moetrt serve exported/tiny --replicas 2                 # Ray Serve replicas

Concurrent requests share forward passes (:mod:`moetrt.serve.engine`). FastAPI, uvicorn and
Ray are imported when a server starts (``pip install 'moetrt[serve]'``), not with this package.
"""

from moetrt.serve.server import DEFAULT_HOST, DEFAULT_PORT, app_from_source, model_name_of, serve

__all__ = ["serve", "app_from_source", "model_name_of", "DEFAULT_HOST", "DEFAULT_PORT"]
