"""The front end's retry on Ray Serve, against a stand-in handle: a request whose replica dies before it
streams a token is resent; one that had streamed tokens fails with a 503 that says so."""

from __future__ import annotations

import asyncio

import pytest

exceptions = pytest.importorskip("ray.exceptions")

from moetrt.serve.app import ApiError  # noqa: E402
from moetrt.serve.engine import TokenEvent  # noqa: E402
from moetrt.serve.replicas import RayGenerator  # noqa: E402


class FakeStream:
    """What ``handle.remote(params)`` returns: yields ``tokens``, then raises ``error`` (if any)."""

    def __init__(self, tokens, error):
        self.tokens, self.error, self.cancelled = list(tokens), error, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.tokens:
            token = self.tokens.pop(0)
            return TokenEvent(token=token, finish_reason="length" if not self.tokens and not self.error else None)
        if self.error is not None:
            raise self.error
        raise StopAsyncIteration

    def cancel(self):
        self.cancelled = True


class FakeHandle:
    """Each call answers with the next (tokens, error) of ``plan``."""

    def __init__(self, plan):
        self.plan, self.calls = list(plan), 0

    def options(self, **_):
        return self

    def remote(self, params):
        self.calls += 1
        return FakeStream(*self.plan.pop(0))


def run(generator):
    async def go():
        return [event.token async for event in generator.events(params=None)]

    return asyncio.run(go())


def test_a_request_is_resent_while_nothing_was_streamed():
    died = exceptions.ActorDiedError()
    handle = FakeHandle([([], died), ([], exceptions.ActorUnavailableError("node left", None)), ([5, 6, 7], None)])
    generator = RayGenerator(handle, retries=3)
    assert run(generator) == [5, 6, 7]
    assert handle.calls == 3 and generator.retried == 2


def test_a_request_that_streamed_fails_with_503():
    generator = RayGenerator(FakeHandle([([5], exceptions.ActorDiedError()), ([9], None)]), retries=3)
    with pytest.raises(ApiError, match="after it had started streaming") as info:
        run(generator)
    assert info.value.status == 503


def test_retries_are_bounded_and_request_errors_are_not_retried():
    handle = FakeHandle([([], exceptions.ActorDiedError())] * 3)
    with pytest.raises(ApiError, match="failed 3 times"):
        run(RayGenerator(handle, retries=2))
    assert handle.calls == 3
    handle = FakeHandle([([], ValueError("bad request")), ([1], None)])
    with pytest.raises(ValueError):
        run(RayGenerator(handle, retries=3))
    assert handle.calls == 1
