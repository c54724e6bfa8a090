"""One generate loop for every back end: prefill, then KV-cache decode, one token per step.

Shape legend: B prompts, L longest prompt, V vocab, P cached positions.

Prompts of different lengths are left padded to L; ``attention_mask`` marks the real tokens and
``position_ids = cumsum(attention_mask) - 1`` (padding gets 1), as transformers' ``generate``
does, so a padded row computes what it would alone. Each decode step appends one position to
the mask; a row that produced a stop token keeps feeding the pad token (its output is
ignored) until every row stopped or ``max_new_tokens`` is reached.

Sampling runs on the host in float64 from a NumPy ``Generator``: one uniform draw per row per
step, mapped through the filtered distribution's CDF, so a seed gives the same tokens on every
back end that gives the same logits.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from moetrt.errors import MoetrtError
from moetrt.runtime.backend import Backend, Feeds
from moetrt.runtime.expert_stats import ExpertStats

__all__ = ["SamplingOptions", "Step", "Generation", "sample_next", "left_pad"]


@dataclass(frozen=True)
class SamplingOptions:
    """How to pick each next token. ``temperature`` 0 is greedy (argmax, ties to the lower id)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int | None = None  # keep the k most likely tokens (None or 0: all)
    top_p: float | None = None  # keep the smallest set of tokens whose probability reaches p (None or 1: all)
    seed: int | None = None
    stop_tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, (int, np.integer)) or self.max_new_tokens < 1:
            raise MoetrtError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}",
                              cli=f"--max-new-tokens (-n) must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature is None or not self.temperature >= 0:
            raise MoetrtError(f"temperature must be >= 0 (0: greedy), got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0):
            raise MoetrtError(f"top_k must be a non-negative integer (0 or None: no limit), got {self.top_k!r}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise MoetrtError(f"top_p must be in (0, 1] (1 or None: no limit), got {self.top_p!r}")
        if self.greedy and (self.top_k or (self.top_p is not None and self.top_p < 1.0)):
            raise MoetrtError("top_k and top_p only apply when sampling: set a temperature > 0 (e.g. 0.8)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_next(logits: np.ndarray, options: SamplingOptions, uniform: np.ndarray | None) -> np.ndarray:
    """Next token per row from the last position's ``logits`` float [B, V]; ``uniform`` float64 [B] in [0, 1)."""
    if options.greedy:
        return logits.argmax(axis=-1).astype(np.int64)  # [B]
    assert uniform is not None
    x = logits.astype(np.float64) / options.temperature  # [B, V]
    vocab = x.shape[-1]
    if options.top_k and options.top_k < vocab:
        kth = np.partition(x, vocab - options.top_k, axis=-1)[:, vocab - options.top_k, None]  # [B, 1]
        x = np.where(x < kth, -np.inf, x)
    probs = np.exp(x - x.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)  # [B, V]
    if options.top_p is not None and options.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")  # [B, V], most likely first
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        before = np.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs = np.where(before >= options.top_p, 0.0, sorted_probs)  # the first token always stays
        probs = np.empty_like(probs)
        np.put_along_axis(probs, order, sorted_probs, axis=-1)
    cdf = np.cumsum(probs, axis=-1)  # [B, V]
    threshold = uniform[:, None] * cdf[:, -1:]  # [B, 1]
    return np.argmax(cdf > threshold, axis=-1).astype(np.int64)  # [B], first token past the draw


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pad prompts to the longest: (input_ids [B, L], attention_mask [B, L], position_ids [B, L]), int64."""
    longest = max(len(p) for p in prompts)
    input_ids = np.full((len(prompts), longest), pad_token_id, dtype=np.int64)  # [B, L]
    mask = np.zeros((len(prompts), longest), dtype=np.int64)  # [B, L]
    for row, prompt in enumerate(prompts):
        if len(prompt):
            input_ids[row, longest - len(prompt) :] = prompt
            mask[row, longest - len(prompt) :] = 1
    position_ids = np.where(mask == 1, np.cumsum(mask, axis=-1) - 1, 1)  # [B, L]
    return input_ids, mask, position_ids


@dataclass(slots=True)
class Step:
    """The tokens one step produced."""

    tokens: np.ndarray  # int64 [B]; the pad token for rows that had already stopped
    active: np.ndarray  # bool [B]: rows that produced a real token this step
    stopped: np.ndarray  # bool [B]: rows whose token this step is a stop token
    last: bool  # no step follows


@dataclass
class Generation:
    """One generation over a batch of token-id prompts; iterate it to run, step by step.

    Everything is validated on construction, before the back end does any work. While (and
    after) iterating, ``tokens`` holds the new tokens per prompt (stop token included),
    ``finish_reasons`` ``"stop"`` or ``"length"``, ``stats`` the expert statistics when asked for.
    """

    backend: Backend
    prompts: list[list[int]]
    options: SamplingOptions = field(default_factory=SamplingOptions)
    pad_token_id: int = 0
    expert_stats: bool = False
    # filled while running
    tokens: list[list[int]] = field(init=False)
    finish_reasons: list[str | None] = field(init=False)
    stats: ExpertStats | None = field(init=False, default=None)
    prefill_seconds: float = field(init=False, default=0.0)
    decode_seconds: float = field(init=False, default=0.0)
    decode_steps: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        spec = self.backend.spec
        self.prompts = [[int(t) for t in p] for p in self.prompts]
        if not self.prompts:
            raise MoetrtError("no prompt given; pass at least one prompt")
        for row, prompt in enumerate(self.prompts):
            if not prompt:
                raise MoetrtError(f"prompt {row} is empty; give at least one token")
            low, high = min(prompt), max(prompt)
            if low < 0 or high >= spec.vocab_size:
                bad = low if low < 0 else high
                raise MoetrtError(
                    f"prompt {row} holds token id {bad}, outside the vocabulary 0..{spec.vocab_size - 1}; "
                    "check that the tokenizer matches the model"
                )
        if not 0 <= self.pad_token_id < spec.vocab_size:
            raise MoetrtError(f"pad token id {self.pad_token_id} is outside the vocabulary 0..{spec.vocab_size - 1}")
        longest = max(len(p) for p in self.prompts)
        total = longest + self.options.max_new_tokens
        if total > spec.max_positions:
            message = (f"the longest prompt ({longest} tokens) + {{0}} ({self.options.max_new_tokens}) = {total} "
                       f"exceeds the model's max_position_embeddings ({spec.max_positions}); "
                       "shorten the prompt or lower {0}")
            raise MoetrtError(message.format("max_new_tokens"), cli=message.format("--max-new-tokens (-n)"))
        if self.expert_stats:
            if not spec.router_outputs:
                message = (f"the {self.backend.name} back end gives no router outputs, so expert statistics cannot be "
                           "collected; re-export with router outputs")
                raise MoetrtError(message + " (onnx_from_torch(..., router_outputs=True)) or use backend='torch'",
                                  cli=message + " (moetrt export --router-outputs) or use --backend torch")
            self.stats = ExpertStats.empty(spec)
        self.tokens = [[] for _ in self.prompts]
        self.finish_reasons = [None] * len(self.prompts)
        self._started = False

    def __iter__(self) -> Iterator[Step]:
        if self._started:
            raise MoetrtError("a Generation runs once; start a new one to generate again")
        self._started = True
        backend, options, spec = self.backend, self.options, self.backend.spec
        batch = len(self.prompts)
        rng = np.random.default_rng(options.seed)
        stop = np.array(sorted(set(options.stop_tokens)), dtype=np.int64)

        input_ids, mask, position_ids = left_pad(self.prompts, self.pad_token_id)  # [B, L] x3
        feeds: Feeds = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}
        feeds.update(backend.empty_past(batch))
        # the whole run's attention mask, written once: step t feeds the view of its first L + t columns
        longest = mask.shape[1]
        full_mask = np.ones((batch, longest + options.max_new_tokens), dtype=np.int64)  # [B, L + N]
        full_mask[:, :longest] = mask
        positions = mask.sum(axis=1, keepdims=True)  # [B, 1]: the next position of every row
        pairs = spec.state.pairs()  # (present, past): what each step feeds back
        keep = mask.astype(bool)  # [B, S]: the real tokens of this step's input
        active = np.ones(batch, dtype=bool)  # [B]: rows still generating
        all_active = True
        everyone = np.ones(batch, dtype=bool)  # Step.active while no row has stopped: one read-only array
        everyone.flags.writeable = False
        nobody = np.zeros(batch, dtype=bool)  # Step.stopped without stop tokens
        nobody.flags.writeable = False
        greedy, want_router, rows = options.greedy, self.stats is not None, self.tokens
        rows_index = np.arange(batch)
        for step in range(options.max_new_tokens):
            start = time.perf_counter()
            outputs = backend.forward(feeds, want_router=want_router)
            if want_router:
                self.stats.add(outputs, keep.reshape(-1))
            logits = np.asarray(outputs["logits"])[:, -1, :]  # [B, V], a view
            if greedy:
                # argmax picks a NaN or +inf wherever one is, so the chosen logits are finite iff the row has no NaN
                # and no +inf: one value per row to check instead of V (-inf only ever loses, and greedy is defined)
                next_tokens = sample_next(logits, options, None)  # [B]
                checked = logits[rows_index, next_tokens]  # [B]
            else:
                checked = logits  # [B, V]
            if not np.isfinite(checked if all_active else checked[active]).all():
                raise MoetrtError(
                    f"the model produced non-finite logits at step {step} on the {backend.name} back end; the "
                    "weights hold NaN/Inf, or fp16 overflowed (try the fp32 model)"
                )
            if not greedy:
                next_tokens = sample_next(logits, options, rng.random(batch))  # [B]
            if not all_active:
                next_tokens = np.where(active, next_tokens, self.pad_token_id)
            # [B]; a comparison with each stop token: np.isin costs more than the step's other NumPy together
            stopped = active & (next_tokens[:, None] == stop).any(axis=1) if len(stop) else nobody
            elapsed = time.perf_counter() - start
            if step == 0:
                self.prefill_seconds = elapsed
            else:
                self.decode_seconds += elapsed
                self.decode_steps += 1

            if all_active:
                for row, token in zip(rows, next_tokens.tolist()):
                    row.append(token)
                was_active = everyone
            else:
                for row, token, on in zip(rows, next_tokens.tolist(), active.tolist()):
                    if on:
                        row.append(token)
                was_active = active
            if stopped.any():
                for row in np.flatnonzero(stopped):
                    self.finish_reasons[row] = "stop"
                active = active & ~stopped  # a new array: was_active keeps this step's rows
                all_active = False
            last = step == options.max_new_tokens - 1 or not (all_active or active.any())
            if last:
                for row in np.flatnonzero(active):
                    self.finish_reasons[row] = "length"
            yield Step(tokens=next_tokens, active=was_active, stopped=stopped, last=last)
            if last:
                return

            feeds = {
                "input_ids": next_tokens[:, None],  # [B, 1]
                "attention_mask": full_mask[:, : longest + step + 1],  # [B, P+1]
                "position_ids": positions,  # [B, 1]
            }
            positions = positions + 1
            for present, past in pairs:
                feeds[past] = outputs[present]  # [B, G, P+1, Hd] for key/value, back-end native
            keep = active[:, None]  # [B, 1]: rows that stopped feed padding

    def run(self) -> Generation:
        for _ in self:
            pass
        return self
