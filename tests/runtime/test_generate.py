"""The generate loop: parity with transformers' generate, the loop's bookkeeping on a scripted back end,
sampling, streaming, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moetrt
from moetrt.errors import MoetrtError
from moetrt.runtime import ModelSpec, SamplingOptions, Session, sample_next
from moetrt.runtime.backend import past_names, present_names
from moetrt.runtime.generate import Generation, left_pad
from tests.hf_tiny import hf_greedy
from tests.runtime.tiny_models import EOS

# prompts of different lengths (ids of the 96-token transformers model)
HF_PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23]]
HF_STEPS = 40

TEXT_PROMPTS = ["once upon a time", "the cat sat on the mat", "dog"]

SAMPLING_CASES = [  # (temperature, top_k, top_p)
    (1.0, None, None),
    (0.7, 5, None),
    (1.3, None, 0.8),
    (0.9, 8, 0.9),
]


# --- parity with transformers -------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_greedy_matches_transformers_generate(backend, hf_mixtral, hf_model_export):
    expected = hf_greedy(hf_mixtral, HF_PROMPTS, HF_STEPS)
    source = moetrt.from_pretrained(hf_mixtral) if backend == "torch" else hf_model_export
    session = Session(source, backend=backend)
    result = session.generate(HF_PROMPTS, max_new_tokens=HF_STEPS, stop_tokens=())
    assert [len(t) for t in result.tokens] == [HF_STEPS] * 3
    assert result.tokens == expected
    assert result.finish_reasons == ["length"] * 3


def test_session_takes_a_transformers_model_directly(hf_mixtral):
    result = Session(hf_mixtral).generate(HF_PROMPTS[:1], max_new_tokens=8, stop_tokens=())
    assert result.tokens == [hf_greedy(hf_mixtral, HF_PROMPTS[:1], 8)[0]]


def test_batch_equals_rows_one_by_one(text_checkpoint):
    session = Session(text_checkpoint)
    batch = session.generate(TEXT_PROMPTS, max_new_tokens=16, stop_tokens=())
    for row, prompt in enumerate(TEXT_PROMPTS):
        alone = session.generate(prompt, max_new_tokens=16, stop_tokens=())
        assert alone.tokens[0] == batch.tokens[row]


# --- sampling -----------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature,top_k,top_p", SAMPLING_CASES)
def test_sampling_with_a_seed_is_reproducible(temperature, top_k, top_p, text_checkpoint, text_export):
    options = dict(max_new_tokens=20, temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=())
    torch_session, ort_session = Session(text_checkpoint), Session(text_export, backend="ort")
    first = torch_session.generate(TEXT_PROMPTS, seed=7, **options).tokens
    assert torch_session.generate(TEXT_PROMPTS, seed=7, **options).tokens == first
    assert ort_session.generate(TEXT_PROMPTS, seed=7, **options).tokens == first  # same seed, other back end
    assert torch_session.generate(TEXT_PROMPTS, seed=8, **options).tokens != first


def test_sample_next_top_k_1_and_tiny_top_p_are_greedy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 50)).astype(np.float32)  # [B, V]
    greedy = sample_next(logits, SamplingOptions(), None)
    uniform = rng.random(64)
    assert (sample_next(logits, SamplingOptions(temperature=1.0, top_k=1), uniform) == greedy).all()
    assert (sample_next(logits, SamplingOptions(temperature=1.0, top_p=1e-6), uniform) == greedy).all()


def test_sample_next_frequencies_follow_the_filtered_distribution():
    logits = np.log(np.array([[0.5, 0.25, 0.15, 0.1]], dtype=np.float32))  # probabilities as logits
    draws = 40_000
    batch = np.repeat(logits, draws, axis=0)  # [N, 4]
    uniform = np.random.default_rng(0).random(draws)

    def freq(options):
        return np.bincount(sample_next(batch, options, uniform), minlength=4) / draws

    # NOTE: 40k draws: the standard error of each frequency is below 0.0025, so 0.01 is 4 sigma
    np.testing.assert_allclose(freq(SamplingOptions(temperature=1.0)), [0.5, 0.25, 0.15, 0.1], atol=0.01)
    np.testing.assert_allclose(freq(SamplingOptions(temperature=1.0, top_k=2)), [2 / 3, 1 / 3, 0, 0], atol=0.01)
    # top_p 0.7: 0.5 alone is short of it, 0.5 + 0.25 reaches it
    np.testing.assert_allclose(freq(SamplingOptions(temperature=1.0, top_p=0.7)), [2 / 3, 1 / 3, 0, 0], atol=0.01)
    sharp = freq(SamplingOptions(temperature=0.5))  # p^2 renormalised
    np.testing.assert_allclose(sharp, np.array([0.25, 0.0625, 0.0225, 0.01]) / 0.345, atol=0.01)


# --- streaming ----------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_streaming_yields_the_same_tokens_as_generate(backend, temperature, text_checkpoint, text_export):
    session = Session(text_checkpoint if backend == "torch" else text_export, backend=backend)
    options = dict(max_new_tokens=24, temperature=temperature, seed=3)
    result = session.generate(TEXT_PROMPTS, **options)
    stream = session.stream(TEXT_PROMPTS, **options)
    tokens, texts = [[] for _ in TEXT_PROMPTS], ["" for _ in TEXT_PROMPTS]
    finished = [0] * len(TEXT_PROMPTS)
    for piece in stream:
        assert not finished[piece.index], "a piece came after its prompt finished"
        tokens[piece.index].append(piece.token)
        texts[piece.index] += piece.text
        finished[piece.index] += piece.finished
    assert tokens == result.tokens
    assert texts == result.texts
    assert finished == [1, 1, 1]
    assert stream.result is not None and stream.result.tokens == result.tokens


def test_stop_token_from_generation_config_ends_a_row(text_checkpoint):
    session = Session(text_checkpoint)
    assert session.stop_tokens == (EOS,)
    free = session.generate(TEXT_PROMPTS, max_new_tokens=30, stop_tokens=())
    stopped = session.generate(TEXT_PROMPTS, max_new_tokens=30)
    for row, tokens in enumerate(free.tokens):
        if EOS in tokens:
            cut = tokens.index(EOS) + 1
            assert stopped.tokens[row] == tokens[:cut] and stopped.finish_reasons[row] == "stop"
        else:
            assert stopped.tokens[row] == tokens and stopped.finish_reasons[row] == "length"
    assert any(EOS in t for t in free.tokens), "pick prompts/steps so that some row meets eos"


# --- the loop's bookkeeping, on a scripted back end -----------------------------------------------
class ScriptedBackend:
    """Next token = last input token + 1 (mod V). Its "KV cache" records every token it was fed
    (in key) and every position id (in value), so the test sees what the loop fed."""

    name, device = "scripted", "cpu"

    def __init__(self, vocab=16, layers=2, max_positions=64):
        self.config = moetrt.MoEConfig(
            vocab_size=vocab, hidden_size=8, num_hidden_layers=layers, num_attention_heads=2,
            num_key_value_heads=1, num_experts=2, num_experts_per_tok=1, intermediate_size=8,
            max_position_embeddings=max_positions,
        )
        self.spec = ModelSpec.from_config(self.config, "float32", router_outputs=False)
        self.calls = []

    def empty_past(self, batch):
        empty = np.zeros((batch, 1, 0, 1), dtype=np.float32)
        return {name: empty for i in range(self.spec.num_layers) for name in past_names(i)}

    def forward(self, feeds, want_router=False):
        self.calls.append(feeds)
        ids, mask, pos = feeds["input_ids"], feeds["attention_mask"], feeds["position_ids"]
        batch, seq = ids.shape
        past = feeds[past_names(0)[0]].shape[2]
        assert mask.shape == (batch, past + seq) and pos.shape == (batch, seq)
        logits = np.zeros((batch, seq, self.spec.vocab_size), dtype=np.float32)
        logits[np.arange(batch)[:, None], np.arange(seq), (ids + 1) % self.spec.vocab_size] = 10.0
        out = {"logits": logits}
        for i in range(self.spec.num_layers):
            (pk, pv), (ck, cv) = past_names(i), present_names(i)
            out[ck] = np.concatenate([feeds[pk], ids[:, None, :, None].astype(np.float32)], axis=2)
            out[cv] = np.concatenate([feeds[pv], pos[:, None, :, None].astype(np.float32)], axis=2)
        return out


def test_loop_left_pads_counts_positions_and_threads_the_cache():
    backend = ScriptedBackend()
    prompts = [[3, 4, 5], [9], [1, 2]]
    generation = Generation(backend, prompts, SamplingOptions(max_new_tokens=6, stop_tokens=(12,)), pad_token_id=0).run()
    # row 1 counts 10, 11, 12 and stops at 12; the others run to the length limit
    assert generation.tokens == [[6, 7, 8, 9, 10, 11], [10, 11, 12], [3, 4, 5, 6, 7, 8]]
    assert generation.finish_reasons == ["length", "stop", "length"]
    prefill = backend.calls[0]
    np.testing.assert_array_equal(prefill["input_ids"], [[3, 4, 5], [0, 0, 9], [0, 1, 2]])
    np.testing.assert_array_equal(prefill["attention_mask"], [[1, 1, 1], [0, 0, 1], [0, 1, 1]])
    np.testing.assert_array_equal(prefill["position_ids"], [[0, 1, 2], [1, 1, 0], [1, 0, 1]])
    last = backend.calls[-1]
    assert len(backend.calls) == 6 and last["attention_mask"].shape == (3, 3 + 5)
    np.testing.assert_array_equal(last["position_ids"], [[7], [5], [6]])
    # the cache holds every token fed before: prompt, generated tokens, then padding after the stop token
    fed = np.concatenate([last[past_names(1)[0]][:, 0, :, 0], last["input_ids"]], axis=1)  # [B, P+1]
    np.testing.assert_array_equal(fed, [[3, 4, 5, 6, 7, 8, 9, 10], [0, 0, 9, 10, 11, 12, 0, 0], [0, 1, 2, 3, 4, 5, 6, 7]])


def test_loop_stops_when_every_row_stopped():
    backend = ScriptedBackend()
    generation = Generation(backend, [[3], [5]], SamplingOptions(max_new_tokens=20, stop_tokens=(5, 7)), pad_token_id=0)
    generation.run()
    assert generation.tokens == [[4, 5], [6, 7]]
    assert len(backend.calls) == 2


class PoisonedBackend(ScriptedBackend):
    """The scripted back end with one logit of every row replaced by ``value`` from step ``at`` on (token 0's
    logit, never the scripted winner), and row ``row_only`` alone when it is given."""

    def __init__(self, value, at=1, row_only=None):
        super().__init__()
        self.value, self.at, self.row_only = value, at, row_only

    def forward(self, feeds, want_router=False):
        out = super().forward(feeds, want_router)
        if len(self.calls) > self.at:
            out["logits"][slice(None) if self.row_only is None else self.row_only, -1, 0] = self.value
        return out


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_logits_stop_the_loop_with_the_step(value, temperature):
    # greedy checks only the chosen logits: a NaN or +inf anywhere in a row wins argmax, so it is caught all the same
    generation = Generation(PoisonedBackend(value, at=2), [[3], [5]], SamplingOptions(max_new_tokens=6, temperature=temperature, seed=0))
    with pytest.raises(MoetrtError, match="non-finite logits at step 2 on the scripted back end"):
        generation.run()


def test_greedy_goes_on_past_minus_inf_and_a_stopped_rows_logits():
    # -inf never wins argmax: greedy is defined and the tokens are the scripted ones
    generation = Generation(PoisonedBackend(-np.inf, at=0), [[3], [5]], SamplingOptions(max_new_tokens=4)).run()
    assert generation.tokens == [[4, 5, 6, 7], [6, 7, 8, 9]]
    # row 1 stops at 7 (step 1); from step 2 on only its logits hold NaN: the rows still running are checked
    generation = Generation(PoisonedBackend(np.nan, at=2, row_only=1), [[3], [5]],
                            SamplingOptions(max_new_tokens=4, stop_tokens=(7,))).run()
    assert generation.tokens == [[4, 5, 6, 7], [6, 7]]
    assert generation.finish_reasons == ["stop", "stop"]


def test_left_pad_positions_are_cumsum_of_mask_minus_one():
    ids, mask, pos = left_pad([[7, 8, 9, 10], [5]], pad_token_id=0)
    np.testing.assert_array_equal(ids, [[7, 8, 9, 10], [0, 0, 0, 5]])
    np.testing.assert_array_equal(pos[mask == 1], (np.cumsum(mask, -1) - 1)[mask == 1])


# --- validation before any work -----------------------------------------------------------------
INVALID = [  # (prompts, options, words the message must contain)
    ([[3, 99]], {}, "outside the vocabulary"),
    ([[3, -1]], {}, "outside the vocabulary"),
    ([[]], {}, "empty"),
    ([], {}, "no prompt"),
    ([[1] * 60], {"max_new_tokens": 5}, "max_position_embeddings"),
    ([[1]], {"max_new_tokens": 0}, "max_new_tokens"),
    ([[1]], {"temperature": -1.0}, "temperature"),
    ([[1]], {"top_k": 5}, "set a temperature"),
    ([[1]], {"temperature": 1.0, "top_p": 1.5}, "top_p"),
]


@pytest.mark.parametrize("prompts,options,message", INVALID)
def test_invalid_requests_fail_before_any_work(prompts, options, message):
    backend = ScriptedBackend(max_positions=64)
    with pytest.raises(MoetrtError, match=message):
        Generation(backend, prompts, SamplingOptions(**options))
    assert backend.calls == []


def test_text_prompt_without_tokenizer_says_to_pass_ids():
    session = Session(ScriptedBackend())
    with pytest.raises(MoetrtError, match="no tokenizer.json"):
        session.generate("hello")
    assert session.generate([3, 4], max_new_tokens=2, stop_tokens=()).tokens == [[5, 6]]
