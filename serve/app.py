"""The OpenAI-compatible HTTP app (FastAPI): completions, chat completions, models, health.

    POST /v1/completions         prompt (text or token ids) -> text; "stream": true as server-sent events
    POST /v1/chat/completions    messages through the tokenizer's chat template (400 without one)
    GET  /v1/models              the one model served
    GET  /health                 200 once the model is loaded (no API key needed)

Request fields: ``model``, ``max_tokens`` (chat: also ``max_completion_tokens``), ``temperature``,
``top_p``, ``seed``, ``stop`` (strings), ``n`` (1 only), ``logprobs`` (completions: an int 0..5;
chat: a bool with ``top_logprobs`` 0..20), ``stream``, ``stream_options.include_usage``. Errors
have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with 400 for a bad
request, 401 for a missing or wrong API key, 404 for an unknown model, 504 when a request runs
past the server's request timeout, 503 when a Ray replica failed after the request had started
streaming. ``GET /health`` needs no key.

The app does not run the model itself: it talks to a :class:`Generator` (token ids and sampling
options in, :class:`~moetrt.serve.engine.TokenEvent` out). :class:`LocalGenerator` runs a
:class:`~moetrt.serve.engine.BatchEngine` in this process; ``moetrt.serve.replicas`` sends requests
to Ray Serve replicas.
"""

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from moetrt.errors import MoetrtError
from moetrt.runtime.generate import SamplingOptions
from moetrt.runtime.text import IncrementalDecoder, Tokenizer
from moetrt.serve.chat import ChatTemplate
from moetrt.serve.engine import BatchEngine, Request, TokenEvent

__all__ = ["create_app", "ModelInfo", "Generator", "LocalGenerator", "GenerateParams", "ApiError"]

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions' logprobs
MAX_CHAT_TOP_LOGPROBS = 20  # and for chat's top_logprobs
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass
class ModelInfo:
    """What the HTTP side needs to know about the served model (no weights)."""

    name: str
    tokenizer: Tokenizer | None
    chat_template: ChatTemplate | None
    stop_tokens: tuple[int, ...]
    max_positions: int
    vocab_size: int

    @classmethod
    def from_session(cls, session: Any, name: str) -> "ModelInfo":
        return cls(
            name=name,
            tokenizer=session.tokenizer,
            chat_template=ChatTemplate.from_folder(session.folder),
            stop_tokens=tuple(session.stop_tokens),
            max_positions=session.spec.max_positions,
            vocab_size=session.spec.vocab_size,
        )


@dataclass
class GenerateParams:
    """One request as the model runs it: token ids, sampling options, how many log-probabilities."""

    prompt: list[int]
    options: SamplingOptions
    top_logprobs: int = 0  # how many log-probabilities the model side computes per token (0: none)
    report_logprobs: bool = False  # the response carries log-probabilities
    report_top: int = 0  # ... and this many most likely alternatives per token


class Generator(Protocol):
    """Runs requests: ``events`` yields one :class:`TokenEvent` per new token, the last with a finish reason."""

    def events(self, params: GenerateParams) -> AsyncIterator[TokenEvent]: ...

    def close(self) -> None: ...


class LocalGenerator:
    """Requests run on a :class:`BatchEngine` in this process."""

    def __init__(self, engine: BatchEngine):
        self.engine = engine

    async def events(self, params: GenerateParams) -> AsyncIterator[TokenEvent]:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[TokenEvent] = asyncio.Queue()
        request = Request(params.prompt, params.options, emit=lambda e: loop.call_soon_threadsafe(inbox.put_nowait, e),
                          top_logprobs=params.top_logprobs)
        self.engine.submit(request)
        try:
            while True:
                event = await inbox.get()
                if event.error is not None:
                    raise event.error
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            request.cancel()  # the client left, a stop string matched, or the request timed out

    def close(self) -> None:
        self.engine.close()


class ApiError(Exception):
    """An error the client caused (or a timeout), answered with OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def kind(self) -> str:
        return {401: "authentication_error", 404: "invalid_request_error", 504: "timeout"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def create_app(
    info: ModelInfo,
    generator: Generator,
    api_key: str | None = None,
    request_timeout: float = 600.0,
) -> Any:
    """The FastAPI app serving ``info``'s model through ``generator``; closes ``generator`` on shutdown.

    (This module does without ``from __future__ import annotations``: FastAPI reads the route
    handlers' annotations, and ``Request`` is imported here, where FastAPI is imported.)"""
    import contextlib

    from fastapi import FastAPI, Request as HttpRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        generator.close()

    app = FastAPI(title=f"moetrt: {info.name}", lifespan=lifespan)
    app.state.generator, app.state.info = generator, info
    created = int(time.time())

    def error_response(error: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):  # unknown routes, wrong methods
        return error_response(ApiError(exc.status_code, str(exc.detail), code=str(exc.status_code)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return error_response(ApiError(400, str(exc)))

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):  # a bug in moetrt: still OpenAI's shape, with what it was
        return error_response(ApiError(500, f"the server failed: {type(exc).__name__}: {exc}"))

    @app.middleware("http")
    async def _check_key(request: HttpRequest, call_next):
        if api_key is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(token.encode(), api_key.encode()):
                what = "no API key was given" if not token else "the API key is wrong"
                return error_response(ApiError(401, f"{what}; send it as 'Authorization: Bearer <key>' "
                                                    "(the openai client's api_key)", code="invalid_api_key"))
        return await call_next(request)

    @app.get("/health")
    async def health():
        status = {"status": "ok", "model": info.name}
        if hasattr(generator, "retried"):  # replicas: requests resent after their replica failed
            status["retried"] = generator.retried
        return status

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(info.name, created)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != info.name:
            raise _unknown_model(name, info.name)
        return _model_card(info.name, created)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await _respond(await _json_body(request), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        return await _respond(await _json_body(request), chat=True)

    async def _respond(body: dict[str, Any], chat: bool):
        prompt = _chat_prompt(body, info) if chat else _completion_prompt(body, info)
        params = _params(body, info, prompt, chat=chat)
        stops = _stop_strings(body)
        run = _Run(info, generator, params, stops, request_timeout, chat)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            first = await run.start()  # errors before the first token are still HTTP errors
            return StreamingResponse(_sse(run, first, chat, include_usage, info.name), media_type="text/event-stream")
        await run.collect()
        return JSONResponse(_full_response(run, chat, info.name))

    return app


# --- requests ----------------------------------------------------------------------------------
async def _json_body(request: Any) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc}); send a JSON object") from exc
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "moetrt"}


def _unknown_model(name: Any, served: str) -> ApiError:
    return ApiError(404, f"the model {name!r} does not exist here; this server serves {served!r}",
                    param="model", code="model_not_found")


def _completion_prompt(body: dict[str, Any], info: ModelInfo) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "the prompt is empty; give at least one character", param="prompt")
        return _encode(info, prompt, "prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < info.vocab_size]
        if bad:
            raise ApiError(400, f"prompt token id {bad[0]} is outside the vocabulary 0..{info.vocab_size - 1}",
                           param="prompt")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise ApiError(400, "one prompt per request: send the prompts as separate (concurrent) requests, "
                            "which the server batches", param="prompt")
    raise ApiError(400, "prompt must be a non-empty string or a list of token ids", param="prompt")


def _chat_prompt(body: dict[str, Any], info: ModelInfo) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a 'role' and a 'content'", param="messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ApiError(400, f"messages[{i}].content holds non-text parts; this model reads text only",
                               param="messages")
            message = dict(message, content="".join(p.get("text", "") for p in content))
            messages[i] = message
        elif not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", param="messages")
    if info.chat_template is None:
        raise ApiError(400, f"the model {info.name!r} has no chat template (no chat_template in its tokenizer_config.json "
                            "or chat_template.jinja), so it cannot take chat messages; use /v1/completions with a "
                            "prompt instead", param="messages", code="no_chat_template")
    try:
        text = info.chat_template.render(messages)
    except MoetrtError as exc:
        raise ApiError(400, str(exc), param="messages") from exc
    return _encode(info, text, "messages")


def _encode(info: ModelInfo, text: str, param: str) -> list[int]:
    if info.tokenizer is None:
        raise ApiError(400, f"the model {info.name!r} has no tokenizer.json, so it takes token ids only: "
                            "send the prompt as a list of token ids", param=param)
    ids = info.tokenizer.encode(text)
    if not ids:
        raise ApiError(400, "the prompt encodes to no tokens; give some text", param=param)
    return ids


def _number(body: dict[str, Any], name: str, default: Any, kind: type, low: float | None = None,
            high: float | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        bounds = f" in [{low}, {high}]" if high is not None else f" >= {low}" if low is not None else ""
        raise ApiError(400, f"{name} must be {'an integer' if kind is int else 'a number'}{bounds}, got {value!r}",
                       param=name)
    return kind(value)


def _params(body: dict[str, Any], info: ModelInfo, prompt: list[int], chat: bool) -> GenerateParams:
    if body.get("model") != info.name:
        if not isinstance(body.get("model"), str):
            raise ApiError(400, f"model is required: this server serves {info.name!r}", param="model")
        raise _unknown_model(body.get("model"), info.name)
    if _number(body, "n", 1, int, 1) != 1:
        raise ApiError(400, "n must be 1 here; send several requests (the server batches them) for several choices",
                       param="n")
    unsupported = [name for name in ("echo", "suffix", "tools", "functions", "logit_bias") if body.get(name)]
    unsupported += ["best_of"] if body.get("best_of") not in (None, 1) else []
    if unsupported:
        raise ApiError(400, f"{unsupported[0]} is not supported by this server; leave it out", param=unsupported[0])
    room = info.max_positions - len(prompt)
    if room < 1:
        raise ApiError(400, f"the prompt is {len(prompt)} tokens, which leaves no room in the model's "
                            f"{info.max_positions} positions; shorten the prompt", param="messages" if chat else "prompt")
    name = "max_tokens"
    max_tokens = _number(body, "max_tokens", None, int, 1)
    if chat and body.get("max_completion_tokens") is not None:
        name, max_tokens = "max_completion_tokens", _number(body, "max_completion_tokens", None, int, 1)
    if max_tokens is None:
        max_tokens = min(COMPLETIONS_DEFAULT_MAX_TOKENS, room) if not chat else room
    if max_tokens > room:
        raise ApiError(400, f"the prompt ({len(prompt)} tokens) + {name} ({max_tokens}) exceeds the model's "
                            f"{info.max_positions} positions; lower {name} to {room} or less, or shorten the prompt",
                       param=name)
    temperature = _number(body, "temperature", 1.0, float, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, float, 0.0, 1.0)
    if top_p == 0.0:
        raise ApiError(400, "top_p must be > 0 (1 keeps every token)", param="top_p")
    seed = _number(body, "seed", None, int, 0)
    if chat:
        top = 0
        if body.get("logprobs"):
            top = max(1, _number(body, "top_logprobs", 0, int, 0, MAX_CHAT_TOP_LOGPROBS))
        elif body.get("top_logprobs") is not None:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    else:
        logprobs = _number(body, "logprobs", None, int, 0, MAX_COMPLETION_LOGPROBS)
        top = 0 if logprobs is None else max(1, logprobs)
    options = SamplingOptions(
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p if temperature > 0 and top_p < 1.0 else None,  # greedy ignores top_p, as OpenAI does
        seed=seed,
        stop_tokens=info.stop_tokens,
    )
    shown = _number(body, "top_logprobs", 0, int, 0, MAX_CHAT_TOP_LOGPROBS) if chat else (body.get("logprobs") or 0)
    return GenerateParams(prompt=prompt, options=options, top_logprobs=top, report_logprobs=top > 0, report_top=shown)


def _stop_strings(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise ApiError(400, "stop must be a non-empty string or a list of up to 4 of them", param="stop")
    return stop


# --- running a request ---------------------------------------------------------------------------
class _Run:
    """One request in flight: its events turned into text pieces, with stop strings and the timeout applied."""

    def __init__(self, info: ModelInfo, generator: Generator, params: GenerateParams, stops: list[str],
                 timeout: float, chat: bool):
        self.info, self.params, self.stops, self.chat = info, params, stops, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self._events = generator.events(params)
        self._decoder = IncrementalDecoder(info.tokenizer) if info.tokenizer else None
        self.text = ""  # all text so far (stop strings cut off)
        self.sent = 0  # characters of ``text`` handed out as stream pieces
        self.tokens: list[int] = []
        self.logprobs: list[TokenEvent] = []
        self.finish_reason: str | None = None

    async def _next(self) -> TokenEvent | None:
        if self.finish_reason is not None:
            return None
        left = self.deadline - time.monotonic()
        try:
            return await asyncio.wait_for(self._events.__anext__(), timeout=max(left, 0.0))
        except StopAsyncIteration:
            self.finish_reason = self.finish_reason or "length"
            return None
        except (asyncio.TimeoutError, TimeoutError) as exc:
            await self.aclose()
            raise ApiError(504, f"the request ran past the server's request timeout ({self.timeout:g} s); "
                                "lower max_tokens or retry later", code="timeout") from exc
        except MoetrtError as exc:
            raise ApiError(400, str(exc)) from exc

    async def start(self) -> TokenEvent | None:
        event = await self._next()
        if event is not None:
            self._take(event)
        return event

    async def step(self) -> bool:
        """Take the next token; False when the request is finished."""
        event = await self._next()
        if event is None:
            return False
        self._take(event)
        return True

    def _take(self, event: TokenEvent) -> None:
        self.tokens.append(int(event.token))
        self.logprobs.append(event)
        if self._decoder is not None:
            piece = self._decoder.push(int(event.token))
            if event.finish_reason is not None:
                piece += self._decoder.flush()
            self.text += piece
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
        hits = [self.text.find(s, max(0, self.sent - len(s))) for s in self.stops]
        hits = [h for h in hits if h >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.finish_reason = "stop"

    def ready_text(self) -> str:
        """Text that can be sent now: held back while it could still become a stop string."""
        end = len(self.text)
        if self.finish_reason is None and self.stops:
            hold = max(len(s) for s in self.stops) - 1
            end = max(self.sent, end - hold)
        piece = self.text[self.sent : end]
        self.sent = end
        return piece

    async def collect(self) -> None:
        if await self.start() is None:
            return
        try:
            while self.finish_reason is None and await self.step():
                pass
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        await self._events.aclose()

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": len(self.params.prompt), "completion_tokens": len(self.tokens),
                "total_tokens": len(self.params.prompt) + len(self.tokens)}

    def token_text(self, token: int) -> str:
        return self.info.tokenizer.decode([token]) if self.info.tokenizer else str(token)


def _full_response(run: _Run, chat: bool, model: str) -> dict[str, Any]:
    text = run.text
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": _chat_logprobs(run, run.logprobs),
                  "finish_reason": run.finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": _completion_logprobs(run, run.logprobs, 0),
                  "finish_reason": run.finish_reason}
        obj = "text_completion"
    return {"id": run.id, "object": obj, "created": run.created, "model": model, "choices": [choice],
            "usage": run.usage()}


def _completion_logprobs(run: _Run, events: list[TokenEvent], offset: int) -> dict[str, Any] | None:
    if not run.params.report_logprobs:
        return None
    top = run.params.report_top
    tokens = [run.token_text(e.token) for e in events]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in events],
        "top_logprobs": [{run.token_text(t): lp for t, lp in (e.top_logprobs or [])[:top]} if top else None
                         for e in events],
        "text_offset": offsets,
    }


def _chat_logprobs(run: _Run, events: list[TokenEvent]) -> dict[str, Any] | None:
    if not run.params.report_logprobs:
        return None

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = run.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    top = run.params.report_top
    return {"content": [dict(entry(e.token, e.logprob), top_logprobs=[entry(t, lp) for t, lp in (e.top_logprobs or [])[:top]])
                        for e in events]}


async def _sse(run: _Run, first: TokenEvent | None, chat: bool, include_usage: bool, model: str) -> AsyncIterator[bytes]:
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choice: dict[str, Any] | None, usage: dict[str, int] | None = None) -> bytes:
        data = {"id": run.id, "object": obj, "created": run.created, "model": model,
                "choices": [choice] if choice is not None else []}
        if include_usage:
            data["usage"] = usage
        return f"data: {json.dumps(data)}\n\n".encode()

    def piece(text: str, events: list[TokenEvent], finish: str | None, offset: int) -> dict[str, Any]:
        if chat:
            return {"index": 0, "delta": {"content": text} if text or finish is None else {},
                    "logprobs": _chat_logprobs(run, events), "finish_reason": finish}
        return {"index": 0, "text": text, "logprobs": _completion_logprobs(run, events, offset), "finish_reason": finish}

    try:
        if chat:
            yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
        done = 0  # events already sent
        while True:
            finish = run.finish_reason
            offset = run.sent
            text = run.ready_text()
            events = run.logprobs[done:]
            if events or finish is not None:  # a chunk per token, its text empty while held back
                yield chunk(piece(text, events, finish, offset))
                done = len(run.logprobs)
            if finish is not None:
                break
            if not await run.step():
                if run.finish_reason is None:
                    break
        if include_usage:
            yield chunk(None, run.usage())
    except ApiError as exc:
        yield f"data: {json.dumps(exc.body())}\n\n".encode()
    finally:
        await run.aclose()
    yield b"data: [DONE]\n\n"
