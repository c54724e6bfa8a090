"""Fixtures of the serving tests: the tiny preset exported, a copy with a chat template, and a running
server on 127.0.0.1 (uvicorn in a thread of this process, stopped when the module's tests end)."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
import warnings

import pytest

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """The shipped tiny model exported (fp32, ONNX Runtime)."""
    pytest.importorskip("onnxruntime")
    from moetrt.export import onnx_from_torch

    out = tmp_path_factory.mktemp("serve") / "tiny"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_from_torch("tiny", out, router_outputs=False, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_chat_export(tiny_export, tmp_path_factory):
    """``tiny_export`` with a chat template in its tokenizer_config.json."""
    out = tmp_path_factory.mktemp("serve-chat") / "tiny-chat"
    shutil.copytree(tiny_export, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_template=CHAT_TEMPLATE)))
    return out


class RunningServer:
    """uvicorn serving ``app`` on 127.0.0.1:<free port> in a thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start in 30 s"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "the server thread did not stop"


@pytest.fixture
def run_server():
    """Start servers for an app; every one is stopped at the end of the test."""
    started: list[RunningServer] = []

    def start(app) -> RunningServer:
        server = RunningServer(app)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
