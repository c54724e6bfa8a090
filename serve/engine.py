"""Continuous batching over one :class:`moetrt.runtime.Session`: concurrent requests share forward passes.

One engine thread owns the session's back end while it has work. Requests wait in a queue;
at every decode step the engine admits the waiting ones (up to ``max_batch`` rows): it prefills
them as one left-padded batch, then joins their state to the running batch's (left-padding the
shorter past with masked positions) so that the next decode step runs every row at once. Rows
leave the batch as soon as they finish (stop token, ``max_tokens``, or cancelled by the server:
a stop string matched, the client went away, the request timed out)::

    running  [B, P]  --(admit: prefill new rows [N, L], join)-->  [B+N, max(P, L)]
             --(decode step: one token per row)-->  [B+N, max(P, L)+1]  --(finished rows leave)--> ...

A row's tokens are the tokens it would get alone up to float rounding: padding is masked out of
attention and each row keeps its own positions, sampling options and random generator.
``max_batch=1`` runs one request at a time (the baseline of ``benchmarks/bench_serve.py``).

The state a back end returns stays native between decode steps (fed straight back, as the
generate loop does); it is copied to the host only when the batch changes shape (rows join or
leave), which is also what makes it safe to run the new rows' prefill on the same back end.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moetrt.errors import MoetrtError
from moetrt.runtime.generate import SamplingOptions, left_pad, sample_next
from moetrt.runtime.session import RunLock

__all__ = ["BatchEngine", "Request", "TokenEvent"]


@dataclass
class TokenEvent:
    """One new token of a request (``token is None`` only on an error event)."""

    token: int | None
    logprob: float | None = None  # log-probability of ``token`` under the model's distribution
    top_logprobs: list[tuple[int, float]] | None = None  # the most likely tokens and their log-probabilities
    finish_reason: str | None = None  # "stop" | "length" on the request's last token
    error: BaseException | None = None


@dataclass
class Request:
    """A generation request: token ids and sampling options; events arrive through ``emit``."""

    prompt: list[int]
    options: SamplingOptions
    emit: Callable[[TokenEvent], None]
    top_logprobs: int = 0  # 0: no log-probabilities; n >= 1: the chosen token's and the n most likely
    cancelled: threading.Event = field(default_factory=threading.Event)
    # set by the engine
    generated: int = 0
    rng: np.random.Generator | None = None

    def cancel(self) -> None:
        """Stop generating for this request at the next step (no more events are emitted)."""
        self.cancelled.set()


class BatchEngine:
    """Runs requests on ``session``'s back end, ``max_batch`` rows at a time, from one thread.

    ``submit`` is thread-safe and returns at once; ``close`` stops the thread (requests still
    waiting or running get an error event).
    """

    def __init__(self, session: Any, max_batch: int = 16):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.session, self.max_batch = session, int(max_batch)
        self.backend, self.spec = session.backend, session.backend.spec
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._waiting: list[Request] = []
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="moetrt-batch-engine", daemon=True)
        self.steps = 0  # forward passes run (prefills and decode steps), for tests and benchmarks
        self.rows_stepped = 0  # sum over decode steps of the rows they ran
        self._thread.start()

    # --- public -------------------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        if self._closed:
            raise MoetrtError("the batch engine is closed; start a new server")
        self._check(request)
        self._queue.put(request)
        return request

    def close(self, timeout: float = 10.0) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # --- engine thread ------------------------------------------------------------------------
    def _check(self, request: Request) -> None:
        total = len(request.prompt) + request.options.max_new_tokens
        if not request.prompt:
            raise MoetrtError("the prompt is empty; give at least one token")
        if total > self.spec.max_positions:
            raise MoetrtError(
                f"the prompt ({len(request.prompt)} tokens) + max_tokens ({request.options.max_new_tokens}) = {total} "
                f"exceeds the model's {self.spec.max_positions} positions; shorten the prompt or lower max_tokens"
            )
        bad = [t for t in request.prompt if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise MoetrtError(f"token id {bad[0]} is outside the vocabulary 0..{self.spec.vocab_size - 1}")

    def _loop(self) -> None:
        batch: _Batch | None = None
        while True:
            block = batch is None and not self._waiting
            if not self._drain(block):
                break
            self._waiting = [r for r in self._waiting if not r.cancelled.is_set()]
            if batch is None and not self._waiting:
                continue
            try:
                with RunLock.of(self.backend).hold("served batch"):
                    # hold the back end while the batch runs; let go when it drains so that other
                    # users of the same session get their turn between busy periods
                    while True:
                        batch = self._admit(batch)
                        if batch is None:
                            break
                        batch = self._decode(batch)
                        if batch is None and not self._waiting:
                            break
                        if not self._drain(block=False):
                            raise _Closed
                        self._waiting = [r for r in self._waiting if not r.cancelled.is_set()]
            except _Closed:
                break
            except BaseException as exc:  # noqa: BLE001: every request in flight learns why, the engine goes on
                rows = batch.requests if batch is not None else []
                for request in [*rows, *self._waiting]:
                    request.emit(TokenEvent(token=None, error=exc))
                batch, self._waiting = None, []
        for request in [*(batch.requests if batch else []), *self._waiting]:
            request.emit(TokenEvent(token=None, error=MoetrtError("the server is shutting down; retry the request")))

    def _drain(self, block: bool) -> bool:
        """Move queued requests to ``_waiting``; False once closed."""
        try:
            item = self._queue.get(block=block)
            while True:
                if item is None:
                    return False
                item.rng = np.random.default_rng(item.options.seed)
                self._waiting.append(item)
                item = self._queue.get_nowait()
        except queue.Empty:
            return True

    def _admit(self, batch: _Batch | None) -> _Batch | None:
        """Prefill the waiting requests that fit and join them to ``batch``."""
        room = self.max_batch - (len(batch.requests) if batch else 0)
        if room <= 0 or not self._waiting:
            return batch
        chosen: list[Request] = []
        width = batch.width if batch else 0
        need = max((r.options.max_new_tokens - r.generated for r in batch.requests), default=0) if batch else 0
        for request in self._waiting:
            if len(chosen) == room:
                break
            w, n = max(width, len(request.prompt)), max(need, request.options.max_new_tokens)
            if batch is not None and w + n > self.spec.max_positions:
                continue  # joining would push the padded batch past the positions: wait for it to drain
            chosen.append(request)
            width, need = w, n
        if not chosen:
            return batch
        self._waiting = [r for r in self._waiting if r not in chosen]
        input_ids, mask, position_ids = left_pad([r.prompt for r in chosen], self.session.pad_token_id)  # [N, L]
        if batch is not None:
            batch.to_host()  # the prefill may write into the buffers the running batch's state lives in
        feeds = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}
        feeds.update(self.backend.empty_past(len(chosen)))
        outputs = self.backend.forward(feeds)
        self.steps += 1
        new = _Batch(chosen, mask, {name: outputs[p] for p, name in self.spec.state.pairs()}, self.spec)
        self._sample(new, np.asarray(outputs["logits"][:, -1, :]))  # [N, V]
        new.to_host()
        new = new.keep(self._finished(new))
        if batch is None:
            return new
        if new is None:
            return batch
        return batch.join(new)

    def _decode(self, batch: _Batch) -> _Batch | None:
        """One decode step for every row of ``batch``; returns the rows still running."""
        batch.mask = np.concatenate([batch.mask, np.ones((len(batch.requests), 1), dtype=np.int64)], axis=1)  # [B, P+1]
        feeds = {
            "input_ids": batch.next_tokens[:, None],  # [B, 1]
            "attention_mask": batch.mask,
            "position_ids": batch.mask.sum(axis=1, keepdims=True) - 1,  # [B, 1]
            **batch.past,
        }
        outputs = self.backend.forward(feeds)
        self.steps += 1
        self.rows_stepped += len(batch.requests)
        batch.past = {name: outputs[present] for present, name in self.spec.state.pairs()}
        self._sample(batch, np.asarray(outputs["logits"][:, -1, :]))  # [B, V]
        return batch.keep(self._finished(batch))

    def _sample(self, batch: _Batch, logits: np.ndarray) -> None:
        """Sample one token per row of ``logits`` [B, V], each with its request's options and generator."""
        if not np.isfinite(logits).all():
            raise MoetrtError(
                f"the model produced non-finite logits on the {self.backend.name} back end; the weights hold NaN/Inf, "
                "or fp16 overflowed (serve the fp32 model)"
            )
        tokens = np.empty(len(batch.requests), dtype=np.int64)  # [B]
        for row, request in enumerate(batch.requests):
            options = request.options
            uniform = None if options.greedy else request.rng.random(1)  # [1]
            tokens[row] = int(sample_next(logits[row : row + 1], options, uniform)[0])
        batch.next_tokens = tokens
        batch.last_logprobs = None
        if any(r.top_logprobs for r in batch.requests):
            x = logits.astype(np.float64)
            x = x - x.max(axis=-1, keepdims=True)
            batch.last_logprobs = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))  # [B, V] log-softmax

    def _finished(self, batch: _Batch) -> np.ndarray:
        """Emit each row's new token; returns which rows keep running (bool [B])."""
        keep = np.ones(len(batch.requests), dtype=bool)
        logprobs = batch.last_logprobs
        for row, request in enumerate(batch.requests):
            if request.cancelled.is_set():
                keep[row] = False
                continue
            token = int(batch.next_tokens[row])
            request.generated += 1
            reason = None
            if token in request.options.stop_tokens:
                reason = "stop"
            elif request.generated >= request.options.max_new_tokens:
                reason = "length"
            event = TokenEvent(token=token, finish_reason=reason)
            if request.top_logprobs and logprobs is not None:
                row_lp = logprobs[row]  # [V]
                top = np.argsort(-row_lp, kind="stable")[: request.top_logprobs]
                event.logprob = float(row_lp[token])
                event.top_logprobs = [(int(t), float(row_lp[t])) for t in top]
            request.emit(event)
            keep[row] = reason is None
        return keep


class _Closed(Exception):
    pass


class _Batch:
    """The running rows: their requests, attention mask [B, P], state and the token each feeds next."""

    def __init__(self, requests: list[Request], mask: np.ndarray, past: dict[str, Any], spec: Any):
        self.requests, self.mask, self.past, self.spec = list(requests), mask, past, spec
        self.next_tokens = np.zeros(len(requests), dtype=np.int64)
        self.last_logprobs: np.ndarray | None = None

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def to_host(self) -> None:
        """Copy the state off the back end's buffers (NumPy, or a torch tensor of its own)."""
        self.past = {name: _own_copy(value) for name, value in self.past.items()}

    def keep(self, rows: np.ndarray) -> _Batch | None:
        """The batch with only ``rows`` (bool [B]); None when no row is left."""
        if rows.all():
            return self
        if not rows.any():
            return None
        index = np.flatnonzero(rows)
        self.to_host()
        self.requests = [self.requests[i] for i in index]
        self.mask, self.next_tokens = self.mask[index], self.next_tokens[index]
        self.past = {name: _take_rows(value, index) for name, value in self.past.items()}
        first = int(np.argmax(self.mask.any(axis=0)))  # leading columns every remaining row pads
        if first:
            self.mask = self.mask[:, first:]
            self.past = {name: _drop_front(value, self._axis(name), first) for name, value in self.past.items()}
        return self

    def join(self, other: _Batch) -> _Batch:
        """This batch's rows followed by ``other``'s, both left-padded to the longer past."""
        width = max(self.width, other.width)
        past = {}
        for name, value in self.past.items():
            axis = self._axis(name)
            mine = _pad_front(value, axis, width - self.width)
            theirs = _pad_front(other.past[name], axis, width - other.width)
            past[name] = _concat([mine, theirs])
        pad = lambda m: np.pad(m, ((0, 0), (width - m.shape[1], 0)))  # noqa: E731
        self.mask = np.concatenate([pad(self.mask), pad(other.mask)], axis=0)  # [B+N, W]
        self.past = past
        self.requests += other.requests
        self.next_tokens = np.concatenate([self.next_tokens, other.next_tokens])
        return self

    def _axis(self, name: str) -> int | None:
        return self.spec.state.entry_of(name)[1].concat_axis


# --- state arrays: NumPy (ONNX Runtime's OrtValue copied to the host) or torch tensors ----------------
def _is_torch(value: Any) -> bool:
    return type(value).__module__.startswith("torch")


def _own_copy(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value
    if _is_torch(value):
        return value.clone()
    return np.array(value.numpy(), copy=True)  # an OrtValue


def _take_rows(value: Any, index: np.ndarray) -> Any:
    if _is_torch(value):
        import torch

        return value[torch.as_tensor(index, device=value.device)]
    return value[index]


def _drop_front(value: Any, axis: int | None, count: int) -> Any:
    if axis is None:
        return value
    slicer = [slice(None)] * value.ndim
    slicer[axis] = slice(count, None)
    return value[tuple(slicer)]


def _pad_front(value: Any, axis: int | None, count: int) -> Any:
    if axis is None or count == 0:
        return value
    shape = list(value.shape)
    shape[axis] = count
    if _is_torch(value):
        import torch

        return torch.cat([value.new_zeros(shape), value], dim=axis)
    return np.concatenate([np.zeros(shape, dtype=value.dtype), value], axis=axis)


def _concat(values: list[Any]) -> Any:
    if _is_torch(values[0]):
        import torch

        return torch.cat(values, dim=0)
    return np.concatenate(values, axis=0)
