"""A Session shared by threads: generations take turns on the back end and give the tokens of
sequential runs; a stream holds the back end until it is exhausted, closed or dropped."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from moetrt.errors import MoetrtError
from moetrt.runtime import Session

PROMPTS = ["once upon a time", "the cat sat on the mat", "dog", "a dog and a cat"]
SEEDS = [0, 1, 2, 3, 4, 5]


def _source(backend, text_checkpoint, text_export):
    return text_checkpoint if backend == "torch" else text_export


def _run(session, seed, kind):
    options = dict(max_new_tokens=12, temperature=0.9, top_k=20, seed=seed, stop_tokens=())
    prompts = PROMPTS[seed % 2 :: 2]
    if kind == "generate":
        return session.generate(prompts, **options).tokens
    stream = session.stream(prompts, **options)
    pieces = [(p.index, p.token) for p in stream]
    return stream.result.tokens, pieces


@pytest.mark.parametrize("kind", ["generate", "stream"])
@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_threads_give_the_tokens_of_sequential_runs(backend, kind, text_checkpoint, text_export):
    session = Session(_source(backend, text_checkpoint, text_export), backend=backend)
    sequential = {seed: _run(session, seed, kind) for seed in SEEDS}
    assert len({repr(v) for v in sequential.values()}) == len(SEEDS)  # the seeds do give different tokens
    start = threading.Barrier(len(SEEDS))

    def work(seed):
        start.wait(timeout=30)
        return seed, _run(session, seed, kind)

    with ThreadPoolExecutor(len(SEEDS)) as pool:
        threaded = dict(pool.map(work, SEEDS))
    assert threaded == sequential


class RecordingBackend:
    """A back end that notes which thread runs each forward, slowly enough for threads to overlap."""

    def __init__(self, inner):
        self.inner = inner
        self.name, self.device, self.config, self.spec = inner.name, inner.device, inner.config, inner.spec
        self.calls: list[int] = []
        self.running = 0
        self.max_running = 0
        self._count = threading.Lock()

    def empty_past(self, batch):
        return self.inner.empty_past(batch)

    def forward(self, feeds, want_router=False):
        with self._count:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            self.calls.append(threading.get_ident())
            time.sleep(0.002)  # let the other threads try to cut in
            return self.inner.forward(feeds, want_router=want_router)
        finally:
            with self._count:
                self.running -= 1


def test_a_generation_holds_the_back_end_from_first_step_to_last(text_export):
    """Without the lock, steps of different generations interleave (the torch back end's static
    KV cache and a TensorRT context would be overwritten); with it each runs whole."""
    backend = RecordingBackend(Session(text_export, backend="ort").backend)
    session = Session(backend)
    steps = 8

    def work(seed):
        session.generate([10, 11], max_new_tokens=steps, temperature=0.9, seed=seed, stop_tokens=())

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert backend.max_running == 1
    assert len(backend.calls) == 4 * steps
    runs = [backend.calls[i : i + steps] for i in range(0, len(backend.calls), steps)]
    assert all(len(set(run)) == 1 for run in runs), "steps of two generations interleaved"


def test_sessions_on_one_back_end_share_its_lock(text_export):
    first = Session(text_export, backend="ort")
    second = Session(first.backend)
    stream = first.stream("the cat", max_new_tokens=4)
    next(stream)
    with pytest.raises(MoetrtError, match="close"):
        second.generate([12], max_new_tokens=2)
    stream.close()


def test_a_second_call_while_this_thread_streams_says_to_finish_the_stream(text_export):
    session = Session(text_export, backend="ort")
    stream = session.stream("the cat", max_new_tokens=6, stop_tokens=())
    next(stream)
    for call in (lambda: session.generate("dog", max_new_tokens=2),
                 lambda: list(session.stream("dog", max_new_tokens=2)),
                 lambda: session.forward({})):
        with pytest.raises(MoetrtError, match=r"exhaust or close\(\) the stream first"):
            call()
    stream.close()
    assert stream.result is None
    assert len(session.generate("dog", max_new_tokens=2, stop_tokens=()).tokens[0]) == 2


def test_a_dropped_stream_releases_the_back_end(text_export):
    session = Session(text_export, backend="ort")
    stream = session.stream("the cat", max_new_tokens=6)
    next(stream)
    del stream  # no reference cycle: the generator closes at once, releasing the lock
    done = []
    other = threading.Thread(target=lambda: done.append(session.generate("dog", max_new_tokens=2)))
    other.start()
    other.join(timeout=30)
    assert done, "the back end stayed held by a stream nobody references"


def test_an_exhausted_stream_releases_the_back_end_and_keeps_its_result(text_export):
    session = Session(text_export, backend="ort")
    stream = session.stream("the cat", max_new_tokens=3, stop_tokens=())
    tokens = [piece.token for piece in stream]
    assert stream.result is not None and stream.result.tokens == [tokens]
    assert list(stream) == []  # a stream runs once
    assert session.generate("the cat", max_new_tokens=3, stop_tokens=()).tokens == [tokens]
