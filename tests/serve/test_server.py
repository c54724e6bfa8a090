"""The one-process server through the official ``openai`` client: completions, chat, streaming, token
equality with a local Session, log-probabilities, usage, and the 4xx answers to bad requests."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from moetrt.runtime import Session  # noqa: E402
from moetrt.serve import app_from_source  # noqa: E402
from tests.serve.conftest import RunningServer  # noqa: E402

PROMPTS = ["Return the ", "The default value is ", "Create a new "]
KEY = "test-key"


@pytest.fixture(scope="module")
def local(tiny_export):
    return Session(tiny_export, backend="ort")


@pytest.fixture(scope="module")
def server(tiny_chat_export):
    running = RunningServer(app_from_source(tiny_chat_export, backend="ort", model_name="tiny", api_key=KEY,
                                            max_batch=8, request_timeout=60))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


def test_greedy_completions_equal_a_local_session(client, local):
    for prompt in PROMPTS:
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        expected = local.generate(prompt, max_new_tokens=12)
        choice = out.choices[0]
        assert choice.text == expected.texts[0]
        assert choice.finish_reason == expected.finish_reasons[0]
        assert out.usage.prompt_tokens == len(local.encode(prompt))
        assert out.usage.completion_tokens == len(expected.tokens[0])
        assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_concurrent_requests_share_steps_and_keep_their_tokens(client, local, server):
    """Requests sent at once join one batch; each gets the tokens it gets alone."""
    prompts = PROMPTS * 3
    lengths = [4, 9, 14] * 3
    expected = [local.generate(p, max_new_tokens=n).tokens[0] for p, n in zip(prompts, lengths)]

    def ask(i):
        out = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i], temperature=0,
                                        logprobs=1)
        return out.choices[0].logprobs.tokens, out.usage.completion_tokens

    engine = server.server.config.app.state.generator.engine
    steps, rows = engine.steps, engine.rows_stepped
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(ask, range(len(prompts))))
    decode_tokens = sum(n - 1 for n in lengths)  # every request's tokens after its first (prefill) one
    assert engine.rows_stepped - rows <= decode_tokens
    assert engine.steps - steps < len(prompts) + decode_tokens  # fewer forward passes than one at a time
    for (tokens, count), want in zip(results, expected):
        assert count == len(want)
        assert "".join(tokens) == local.decode(want)


def test_prompt_as_token_ids(client, local):
    ids = local.encode("Return the ")
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert out.choices[0].text == local.decode(local.generate(ids, max_new_tokens=6).tokens[0])


def test_streaming_gives_the_same_text(client):
    kwargs = dict(model="tiny", prompt="The default value is ", max_tokens=16, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1


def test_chat_through_the_template(client, local):
    messages = [{"role": "user", "content": "Return the value"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    prompt = "user: Return the value\nassistant: "
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == local.generate(prompt, max_new_tokens=10).texts[0]
    assert out.usage.prompt_tokens == len(local.encode(prompt))
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == out.choices[0].message.content


def test_chat_without_a_template_is_400(tiny_export, run_server):
    running = run_server(app_from_source(tiny_export, backend="ort", model_name="tiny"))
    with openai.OpenAI(base_url=running.url + "/v1", api_key="-", max_retries=0) as c:
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
        # and the server binds 127.0.0.1 with no key required when none is set
        assert c.models.list().data[0].id == "tiny"


def test_logprobs_top1_is_the_greedy_token(client):
    out = client.completions.create(model="tiny", prompt="Return the ", max_tokens=5, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0
        best = max(top, key=top.get)
        assert best == token and top[best] == pytest.approx(logprob)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 3 and c.logprob == c.top_logprobs[0].logprob for c in content)


def test_seeded_sampling_repeats_and_stop_strings_cut(client):
    kwargs = dict(model="tiny", prompt="Create a new ", max_tokens=20, temperature=0.9, top_p=0.95, seed=7)
    first, second = (client.completions.create(**kwargs).choices[0].text for _ in range(2))
    assert first == second
    whole = client.completions.create(model="tiny", prompt="Return the ", max_tokens=20, temperature=0).choices[0].text
    cut = whole.strip()[2:5]
    assert cut and cut in whole
    out = client.completions.create(model="tiny", prompt="Return the ", max_tokens=20, temperature=0, stop=[cut])
    assert out.choices[0].text == whole[: whole.index(cut)]
    assert out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="Return the ", max_tokens=20, temperature=0, stop=cut,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole[: whole.index(cut)]


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # no key needed


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(model="nope", prompt="x"), openai.NotFoundError, "does not exist"),
    (dict(model="tiny", prompt="x", max_tokens=-1), openai.BadRequestError, "max_tokens"),
    (dict(model="tiny", prompt="x", max_tokens=100_000), openai.BadRequestError, "positions"),
    (dict(model="tiny", prompt="x " * 5000, max_tokens=1), openai.BadRequestError, "positions"),
    (dict(model="tiny", prompt="x", n=2), openai.BadRequestError, "n must be 1"),
    (dict(model="tiny", prompt="x", temperature=-1), openai.BadRequestError, "temperature"),
    (dict(model="tiny", prompt=[10 ** 9]), openai.BadRequestError, "vocabulary"),
    (dict(model="tiny", prompt="x", echo=True), openai.BadRequestError, "echo"),
    (dict(model="tiny", prompt="x", top_p=0), openai.BadRequestError, "top_p"),
])
def test_bad_requests_are_4xx_with_a_message(client, kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        client.completions.create(**kwargs)
    body = info.value.response.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}


def test_malformed_json_and_wrong_key(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers=headers)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError):
            c.models.list()


class Stalled:
    """A model side that never produces a token."""

    async def events(self, params):
        await asyncio.sleep(3600)
        yield None

    def close(self):
        pass


def test_request_timeout_is_504(local, run_server):
    from moetrt.serve.app import ModelInfo, create_app

    app = create_app(ModelInfo.from_session(local, "tiny"), Stalled(), request_timeout=0.5)
    running = run_server(app)
    start = time.monotonic()
    r = httpx.post(running.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 4}, timeout=60)
    assert r.status_code == 504 and "timeout" in r.json()["error"]["message"]
    assert time.monotonic() - start < 30
    with httpx.stream("POST", running.url + "/v1/completions", timeout=60,
                      json={"model": "tiny", "prompt": "x", "max_tokens": 4, "stream": True}) as r:
        assert r.status_code == 504  # nothing streamed yet: still an HTTP error


@pytest.mark.parametrize("extra", [[], pytest.param(["--replicas", "1", "--replica-cpus", "0.5"], marks=pytest.mark.slow)],
                         ids=["one-process", "ray-replicas"])
def test_moetrt_serve_tiny_answers_the_openai_client(tmp_path, extra):
    """The CLI in its own process: `moetrt serve tiny` on a free port (on a local Ray with --replicas), stopped
    at the end (Ctrl-C, which also shuts the Ray it started down)."""
    import importlib.util
    import signal
    import subprocess
    import sys

    from tests.serve.conftest import free_port

    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    if extra and importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed (pip install 'moetrt[serve]')")
    proc = subprocess.Popen([sys.executable, "-m", "moetrt.cli", "serve", "tiny", "--port", str(port), *extra],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (log.seek(0), log.read())[1]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "moetrt serve did not answer /health in 180 s"
            time.sleep(0.2)
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=60) as c:
            out = c.completions.create(model="tiny", prompt="Return the ", max_tokens=8, temperature=0)
        assert out.choices[0].text == Session("tiny").generate("Return the ", max_new_tokens=8).texts[0]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
    assert proc.returncode in (0, 130, -signal.SIGINT), proc.returncode


@pytest.mark.parametrize("argv, match", [
    (["--replicas", "0"], "--replicas must be >= 1"),
    (["--autoscaling", "{min_replicas: 1"], "--autoscaling is not valid JSON"),
    (["--autoscaling", "[1, 4]"], "--autoscaling must be a JSON object"),
    (["--port", "70000"], "--port must be in 1..65535"),
])
def test_cli_refuses_bad_options_before_starting_anything(argv, match, capsys):
    from moetrt.cli import main

    assert main(["serve", "tiny", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and match in err[-1]
