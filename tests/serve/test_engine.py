"""The batching engine: requests that join a running batch at any step, leave it when done, and each
get exactly the tokens a Session gives them alone (greedy and seeded sampling), on ort and torch."""

from __future__ import annotations

import queue
import time

import pytest

from moetrt.errors import MoetrtError
from moetrt.runtime import Session
from moetrt.runtime.generate import SamplingOptions
from moetrt.serve.engine import BatchEngine, Request

# prompt, max_tokens, temperature, top_p, seed, when it is submitted (after this many tokens of the first request)
REQUESTS = [
    ("Return the ", 24, 0.0, None, None, 0),
    ("The default value is ", 10, 0.0, None, None, 3),
    ("Create a new list of the values of a mapping, sorted by key ", 16, 0.8, 0.9, 5, 3),  # longer than the batch's past
    ("x", 12, 1.0, None, 11, 8),
    ("Return a ", 6, 0.0, None, None, 20),  # after the second request left
]


@pytest.fixture(scope="module", params=["ort", "torch"])
def session(request, tiny_export):
    return Session(tiny_export, backend=request.param) if request.param == "ort" else Session("tiny")


def collect(engine: BatchEngine, prompt: list[int], options: SamplingOptions) -> tuple[Request, queue.Queue]:
    inbox: queue.Queue = queue.Queue()
    return engine.submit(Request(prompt, options, emit=inbox.put)), inbox


def drain(inbox: queue.Queue, timeout: float = 120) -> tuple[list[int], str]:
    tokens = []
    while True:
        event = inbox.get(timeout=timeout)
        assert event.error is None, event.error
        tokens.append(event.token)
        if event.finish_reason:
            return tokens, event.finish_reason


def test_joining_and_leaving_rows_keep_their_tokens(session):
    engine = BatchEngine(session, max_batch=4)
    try:
        inboxes, first_tokens = [], []
        # no stop tokens: every row runs its max_new_tokens, so the first one is still running when the others join
        options = [SamplingOptions(max_new_tokens=n, temperature=t, top_p=p, seed=s, stop_tokens=())
                   for _, n, t, p, s, _ in REQUESTS]
        _, first = collect(engine, session.encode(REQUESTS[0][0]), options[0])
        inboxes.append(first)
        for (prompt, *_, after), option in zip(REQUESTS[1:], options[1:]):
            while len(first_tokens) < after:  # let the first request run `after` tokens, then join
                event = first.get(timeout=120)
                assert event.error is None
                first_tokens.append(event.token)
            inboxes.append(collect(engine, session.encode(prompt), option)[1])
        results = [drain(box) for box in inboxes[1:]]
        rest, reason = drain(first) if len(first_tokens) < REQUESTS[0][1] else ([], "length")
        results.insert(0, (first_tokens + rest, reason))
        assert engine.rows_stepped > engine.steps  # some steps ran several rows
    finally:
        engine.close()
    for (prompt, n, t, p, s, _), (tokens, reason) in zip(REQUESTS, results):
        alone = session.generate(prompt, max_new_tokens=n, temperature=t, top_p=p, seed=s, stop_tokens=())
        assert tokens == alone.tokens[0], prompt
        assert reason == alone.finish_reasons[0]


def test_one_at_a_time_runs_one_row(session):
    engine = BatchEngine(session, max_batch=1)
    try:
        boxes = [collect(engine, session.encode(p), SamplingOptions(max_new_tokens=5))[1] for p in ("a", "b", "c")]
        for box in boxes:
            assert len(drain(box)[0]) == 5
        assert engine.rows_stepped == engine.steps - 3  # every decode step ran one row (3 prefills)
    finally:
        engine.close()


def test_cancelled_requests_leave_and_bad_ones_are_refused(session):
    engine = BatchEngine(session, max_batch=4)
    try:
        request, box = collect(engine, session.encode("Return the "), SamplingOptions(max_new_tokens=200))
        box.get(timeout=120)
        request.cancel()
        time.sleep(1.0)  # the engine drops it at its next step (milliseconds for this model)
        steps = engine.steps
        time.sleep(0.5)
        assert engine.steps == steps, "a cancelled request kept running"
        too_long = session.spec.max_positions
        with pytest.raises(MoetrtError, match="positions"):
            engine.submit(Request([1] * 10, SamplingOptions(max_new_tokens=too_long), emit=box.put))
        with pytest.raises(MoetrtError, match="vocabulary"):
            engine.submit(Request([10**9], SamplingOptions(max_new_tokens=1), emit=box.put))
    finally:
        engine.close()
    assert not engine.alive
