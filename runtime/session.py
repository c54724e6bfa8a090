"""``Session``: a model on a back end, with text in/out, generation, streaming and expert statistics.

    session = Session("exported/tiny", backend="ort")
    result = session.generate(["Once upon a time", "The cat"], max_new_tokens=32)
    print(result.texts)
    for piece in session.stream("Once upon a time", temperature=0.8, seed=0):
        print(piece.text, end="", flush=True)
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moetrt.config import MoEConfig
from moetrt.errors import MoetrtError
from moetrt.runtime.backend import Backend
from moetrt.runtime.expert_stats import ExpertStats
from moetrt.runtime.generate import Generation, SamplingOptions
from moetrt.runtime.text import IncrementalDecoder, Tokenizer, read_generation_config, token_id_list

__all__ = ["Session", "GenerationResult", "StreamPiece", "Stream", "BACKENDS", "RunLock"]

BACKENDS = ("torch", "ort", "trt")

# a prompt: text, or token ids; or a batch of either
Prompt = str | Sequence[int]


@dataclass
class GenerationResult:
    prompts: list[list[int]]  # token ids of each prompt
    tokens: list[list[int]]  # new token ids per prompt, the stop token included
    texts: list[str] | None  # new text per prompt (special tokens skipped); None without a tokenizer
    finish_reasons: list[str]  # "stop" (a stop token) | "length" (max_new_tokens)
    stats: ExpertStats | None  # when generate(..., expert_stats=True)
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int

    @property
    def decode_tokens_per_second(self) -> float:
        """Decode steps per second, each producing one token per prompt still running."""
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else float("nan")


@dataclass
class StreamPiece:
    index: int  # which prompt of the batch
    token: int  # the new token id
    text: str  # the text this token made printable ("" without a tokenizer, or while a character is incomplete)
    finished: bool  # this prompt generates nothing more


class Stream:
    """Iterates :class:`StreamPiece` as tokens are produced; ``result`` is ready once it is exhausted.

    While it is being iterated the stream holds its session's back end (see :class:`Session`);
    it lets go when exhausted, on :meth:`close`, or when it is garbage-collected.
    """

    def __init__(self, session: Session, generation: Generation, text: bool):
        self._session, self._generation, self._text = session, generation, text
        self._pieces: Iterator[StreamPiece] | None = None
        self.result: GenerationResult | None = None

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> StreamPiece:
        if self._pieces is None:
            # the generator holds no reference to this Stream (a weak one only), so dropping an
            # unfinished stream frees the generator at once, and with it the back end
            self._pieces = _stream_pieces(self._session, self._generation, self._text, weakref.ref(self))
        return next(self._pieces)

    def close(self) -> None:
        """Stop generating and let other callers use the back end (``result`` stays ``None``)."""
        if self._pieces is None:
            self._pieces = iter(())
        else:
            self._pieces.close()  # runs the generator's cleanup: the back end is released


def _stream_pieces(session: Session, generation: Generation, text: bool, stream: weakref.ref) -> Iterator[StreamPiece]:
    tokenizer = session.tokenizer if text else None
    decoders = [IncrementalDecoder(tokenizer) for _ in generation.prompts] if tokenizer else None
    with session._lock.hold("stream"):
        for step in generation:
            for row in np.flatnonzero(step.active):
                token = int(step.tokens[row])
                finished = bool(step.stopped[row]) or step.last
                piece_text = ""
                if decoders is not None:
                    piece_text = decoders[row].push(token)
                    if finished:
                        piece_text += decoders[row].flush()
                yield StreamPiece(index=int(row), token=token, text=piece_text, finished=finished)
    owner = stream()
    if owner is not None:
        owner.result = session._result(generation, text)


class RunLock:
    """One generation (or forward step) at a time on a back end; other threads wait their turn.

    The back ends keep state between the steps of a generation: the torch back end's static KV
    cache (and CUDA graphs) is one buffer per back end that every step writes into, a TensorRT
    execution context holds its input shapes and buffers. Two generations interleaving their
    steps on one back end would overwrite each other's cache, so a generation holds the back end
    from its first step to its last. The same thread asking again while it holds the back end
    (a second stream started before the first one finished) would wait for itself forever, so
    that raises a :class:`MoetrtError` instead.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None  # thread id of the holder; only the holder sets it to itself
        self._what = ""

    @contextlib.contextmanager
    def hold(self, what: str) -> Iterator[None]:
        me = threading.get_ident()
        if self._owner == me:
            raise MoetrtError(
                f"this thread is still running a {self._what} on this back end, so a {what} cannot start: "
                "exhaust or close() the stream first (or run the two prompts as one batch)"
            )
        with self._lock:
            self._owner, self._what = me, what
            try:
                yield
            finally:
                self._owner = None

    @classmethod
    def of(cls, backend: Any) -> RunLock:
        """The lock of ``backend``, shared by every Session built on that back-end object."""
        with _LOCKS_LOCK:
            lock = getattr(backend, "_moetrt_run_lock", None)
            if lock is None:
                lock = cls()
                try:
                    backend._moetrt_run_lock = lock
                except AttributeError:  # a back end with __slots__: the lock is this Session's alone
                    pass
            return lock


_LOCKS_LOCK = threading.Lock()


class Session:
    """A model ready to run: ``Session(source, backend="torch" | "ort" | "trt", device="cpu" | "cuda")``.

    ``source``:
    - ``backend="torch"``: a :class:`moetrt.MoETransformer`, a transformers model, a preset name
      (``"tiny"``), a Hugging Face checkpoint folder, or an exported folder whose recorded source
      exists here;
    - ``backend="ort"`` / ``"trt"``: an exported folder (``moetrt export``);
    - or a ready :class:`Backend` object.

    A model object is moved to ``device`` (and ``dtype``) in place.

    ``backend_options`` go to the back end; for ``backend="torch"`` on CUDA,
    ``expert_precision="fp8"`` runs the routed experts in FP8 e4m3 (see
    :mod:`moetrt.runtime.backend_torch`).

    Text prompts need ``tokenizer.json`` in the model folder; token ids work everywhere. Stop
    tokens default to the folder's ``generation_config.json`` eos ids, else the config's.

    Threads: a Session may be shared by several threads. It runs one generation at a time per
    back end (:class:`RunLock`): ``generate``, ``stream`` and ``forward`` called from other
    threads wait until the running one finishes, and give exactly the tokens they would give
    run one after another (each call has its own random generator, seeded by ``seed``). A
    stream holds the back end from its first token until it is exhausted or closed. For
    throughput, pass the prompts as one batch rather than from several threads; for parallel
    generation, make one Session per thread (each loads its own back end).
    """

    def __init__(
        self,
        source: str | os.PathLike | Any,
        backend: str = "torch",
        device: str | None = None,
        dtype: str | None = None,
        **backend_options: Any,
    ):
        folder: Path | None = None
        if isinstance(source, Backend):
            self.backend = source
        else:
            self.backend, folder = _load_backend(source, backend, device, dtype, backend_options)
        self._lock = RunLock.of(self.backend)
        self.config: MoEConfig = self.backend.config
        self.spec = self.backend.spec
        self.folder = folder  # where tokenizer / generation config files come from; None for in-memory models
        self.tokenizer = Tokenizer.from_folder(folder)
        generation_config = read_generation_config(folder)
        eos = generation_config.get("eos_token_id", self.config.eos_token_id)
        self.stop_tokens: tuple[int, ...] = tuple(token_id_list(eos))
        pad = self.config.pad_token_id
        if pad is None:
            pad = generation_config.get("pad_token_id")
        if pad is None:
            pad = self.stop_tokens[0] if self.stop_tokens else 0
        self.pad_token_id = int(pad)

    def __repr__(self) -> str:
        return (
            f"Session(backend={self.backend.name!r}, device={self.backend.device!r}, "
            f"layers={self.spec.num_layers}, experts={self.spec.num_experts}, "
            f"tokenizer={'yes' if self.tokenizer else 'no'})"
        )

    # --- text ------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            where = f"{self.folder}" if self.folder else "this in-memory model"
            raise MoetrtError(
                f"{where} has no tokenizer.json, so text prompts cannot be encoded; pass token ids instead "
                "(e.g. [1, 5, 9]), or use a model folder that ships its tokenizer"
            )
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            raise MoetrtError("this model has no tokenizer.json, so tokens cannot be decoded to text")
        return self.tokenizer.decode(list(ids))

    # --- running ---------------------------------------------------------------------------
    def forward(self, feeds: dict[str, Any], want_router: bool = False) -> dict[str, Any]:
        """One raw step of the model graph (names and shapes in :mod:`moetrt.runtime.backend`)."""
        with self._lock.hold("forward"):
            return self.backend.forward(feeds, want_router=want_router)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        max_new_tokens: int = 32,
        temperature: float | None = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_tokens: Sequence[int] | None = None,
        expert_stats: bool = False,
    ) -> GenerationResult:
        """Generate for one prompt or a batch; greedy unless ``temperature > 0``.

        ``prompts``: a text, a list of token ids, a list of either, or token ids as transformers
        gives them: a ``torch.Tensor`` / NumPy array ``[T]`` or ``[B, T]``, or the tokenizer's
        ``BatchEncoding`` (its ``attention_mask`` drops the padding).

        ``stop_tokens=None`` uses the model's eos ids; ``()`` generates ``max_new_tokens`` always.
        """
        generation, text = self._generation(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, expert_stats)
        with self._lock.hold("generate"):
            generation.run()
        return self._result(generation, text)

    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        max_new_tokens: int = 32,
        temperature: float | None = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_tokens: Sequence[int] | None = None,
        expert_stats: bool = False,
    ) -> Stream:
        """Like :meth:`generate`, yielding a :class:`StreamPiece` per new token as it comes."""
        generation, text = self._generation(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, expert_stats)
        return Stream(self, generation, text)

    def _generation(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, expert_stats):
        ids, text = self._prompt_ids(prompts)
        options = SamplingOptions(
            max_new_tokens=max_new_tokens,
            temperature=0.0 if temperature is None else temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop_tokens=self.stop_tokens if stop_tokens is None else tuple(int(t) for t in stop_tokens),
        )
        generation = Generation(self.backend, ids, options, pad_token_id=self.pad_token_id, expert_stats=expert_stats)
        return generation, text

    def _prompt_ids(self, prompts: Any) -> tuple[list[list[int]], bool]:
        """(token ids per prompt, whether the prompts were text)."""
        if isinstance(prompts, str):
            return [self.encode(prompts)], True
        batch = _token_array_rows(prompts)
        if batch is not None:
            return batch, False
        if isinstance(prompts, np.ndarray):
            prompts = prompts.tolist()
        if not isinstance(prompts, Sequence) or isinstance(prompts, bytes):
            raise MoetrtError(f"prompts must be text, token ids, or a list of either; got {type(prompts).__name__}")
        if not prompts:
            raise MoetrtError("no prompt given; pass at least one prompt")
        if all(isinstance(p, (int, np.integer)) for p in prompts):
            return [[int(t) for t in prompts]], False
        if all(isinstance(p, str) for p in prompts):
            return [self.encode(p) for p in prompts], True
        if all(isinstance(p, (Sequence, np.ndarray)) and not isinstance(p, str) for p in prompts):
            rows = [list(p) for p in prompts]
            if all(isinstance(t, (int, np.integer)) for row in rows for t in row):
                return [[int(t) for t in row] for row in rows], False
        raise MoetrtError("prompts must be one text, one list of token ids, or a list of texts / token-id lists (not mixed)")

    def _result(self, generation: Generation, text: bool) -> GenerationResult:
        texts = [self.decode(t) for t in generation.tokens] if text and self.tokenizer else None
        return GenerationResult(
            prompts=generation.prompts,
            tokens=generation.tokens,
            texts=texts,
            finish_reasons=[r or "length" for r in generation.finish_reasons],
            stats=generation.stats,
            prefill_seconds=generation.prefill_seconds,
            decode_seconds=generation.decode_seconds,
            decode_steps=generation.decode_steps,
        )


def _token_array_rows(prompts: Any) -> list[list[int]] | None:
    """Token ids as transformers users hold them, one list per row; None for anything else.

    A ``torch.Tensor`` or NumPy array of integers, ``[T]`` (one prompt) or ``[B, T]`` (a batch),
    or a mapping with ``input_ids`` and optionally ``attention_mask`` (a transformers
    ``BatchEncoding``): positions whose mask is 0 (the tokenizer's padding, left or right) are dropped.
    """
    mask = None
    if not isinstance(prompts, (str, bytes, Sequence)) and hasattr(prompts, "keys") and "input_ids" in prompts:
        mask = prompts.get("attention_mask") if hasattr(prompts, "get") else None
        prompts = prompts["input_ids"]
        if not _is_array(prompts):  # tokenizer(..., return_tensors=None): lists
            prompts = np.asarray(prompts)
            mask = None if mask is None else np.asarray(mask)
    if not _is_array(prompts):
        return None
    ids = _as_numpy(prompts)
    if ids.dtype.kind in "USO" and mask is None:  # an array of texts or of lists: as the list it holds
        return None
    if ids.dtype.kind not in "iu":
        raise MoetrtError(f"token ids must be integers; got an array of {ids.dtype} (pass input_ids, not embeddings or logits)")
    if ids.ndim not in (1, 2) or ids.size == 0:
        raise MoetrtError(f"token ids must be [T] or [batch, T] and not empty; got shape {list(ids.shape)}")
    ids = ids.reshape(-1, ids.shape[-1])
    if mask is None:
        return [[int(t) for t in row] for row in ids]
    mask = _as_numpy(mask) if _is_array(mask) else np.asarray(mask)
    if mask.size != ids.size or mask.shape[-1] != ids.shape[-1]:
        raise MoetrtError(f"attention_mask has shape {list(mask.shape)} but input_ids {list(ids.shape)}; pass the pair the tokenizer returned")
    rows = [[int(t) for t, keep in zip(row, keep_row) if keep] for row, keep_row in zip(ids, mask.reshape(ids.shape))]
    if not all(rows):
        raise MoetrtError("a row of attention_mask is all zeros, so that prompt is empty; drop it from the batch")
    return rows


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) or (hasattr(value, "detach") and hasattr(value, "cpu") and hasattr(value, "numpy"))


def _as_numpy(value: Any) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.detach().cpu().numpy()


def _load_backend(
    source: Any, backend: str, device: str | None, dtype: str | None, options: dict[str, Any]
) -> tuple[Backend, Path | None]:
    """The back end for ``source`` and the folder holding its tokenizer files (or None)."""
    from moetrt.runtime.model_folder import source_kind

    if backend not in BACKENDS:
        raise MoetrtError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend != "torch" and "expert_precision" in options:
        raise MoetrtError(f"expert_precision is an option of backend='torch' (FP8 experts on CUDA), not of "
                          f"backend={backend!r}; drop it or use backend='torch'")
    path_like = isinstance(source, (str, os.PathLike))
    kind = source_kind(source) if path_like else "object"

    if backend == "torch":
        from moetrt.runtime.backend_torch import TorchBackend

        loaded = TorchBackend.load(source, device=device or "cpu", dtype=dtype, **options)
        if kind in ("exported", "checkpoint"):
            folder = Path(source)
        else:
            folder = getattr(loaded.model, "source_dir", None)  # set by from_pretrained for folders and "tiny"
        return loaded, folder

    if kind != "exported":
        what = {"checkpoint": "a checkpoint folder", "preset": "a preset name", "object": "an in-memory model"}[kind]
        shown = source if path_like else "<model>"
        message = f"{{}} runs an exported model folder, but {shown} is {what}; export it first "
        raise MoetrtError(
            message.format(f"backend={backend!r}")
            + "(moetrt.export.onnx_from_torch(source, out_dir)), or use backend='torch'",
            cli=message.format(f"--backend {backend}") + f"(moetrt export {shown} -o OUT_DIR), or use --backend torch",
        )
    if dtype is not None:
        raise MoetrtError(f"dtype is fixed by the export for backend={backend!r}; re-export to change it (drop dtype=...)",
                          cli=f"the precision is fixed by the export for --backend {backend}; re-export with "
                              "moetrt export --dtype to change it (drop --dtype)")
    if backend == "ort":
        from moetrt.runtime.backend_ort import OrtBackend

        return OrtBackend(source, device=device or "cpu", **options), Path(source)
    from moetrt.runtime.backend_trt import TrtBackend

    return TrtBackend(source, device=device or "cuda", **options), Path(source)
