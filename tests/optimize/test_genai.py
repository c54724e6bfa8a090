"""onnxruntime-genai runs moetrt's exported and optimized folders through the genai_config.json
they carry (moetrt/genai.py), and its greedy tokens are Session's.

Here rather than beside moetrt/genai.py because it reuses this folder's session-wide exports.
"""

from __future__ import annotations

import json

import pytest

from moetrt.genai import GENAI_CONFIG_FILE, genai_config
from moetrt.runtime import Session

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai (the dev extra) is not installed")

# one variant per family whose layers cache key/value; the latent-attention ones are below
GENAI_VARIANTS = ["mixtral", "qwen2_moe-shared", "qwen3_moe", "olmoe", "gpt_oss", "glm4_moe", "minimax_m2",
                  "ernie4_5_moe", "granitemoeshared", "dbrx", "phimoe",
                  "llama4_text"]  # Llama 4: prompt + 12 new tokens cross its 4-token attention chunks
LATENT_VARIANTS = ["deepseek_v3", "glm4_moe_lite"]
PROMPTS = [[5, 9, 17, 3, 11], [7, 2, 30]]
NEW_TOKENS = 12


def genai_greedy(folder, prompt: list[int], new_tokens: int) -> list[int]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


def session_greedy(folder, prompt, new_tokens: int) -> list[int]:
    return Session(folder, backend="ort").generate([prompt], max_new_tokens=new_tokens, stop_tokens=()).tokens[0]


def assert_same_greedy(folder, prompt, new_tokens: int = NEW_TOKENS) -> None:
    """genai's tokens are Session's; genai stops early only on one of the model's eos ids."""
    got, want = genai_greedy(folder, prompt, new_tokens), session_greedy(folder, prompt, new_tokens)
    assert got == want[: len(got)] and got, (got, want)
    if len(got) < len(want):
        eos = json.loads((folder / GENAI_CONFIG_FILE).read_text())["model"]["eos_token_id"]
        assert got[-1] in (eos if isinstance(eos, list) else [eos]), (got, want, eos)


@pytest.mark.parametrize("variant", GENAI_VARIANTS)
def test_genai_greedy_tokens_equal_the_session_on_every_family(variant, canonical):
    _, folder = canonical(variant)
    meta = json.loads((folder / "moetrt.json").read_text())
    assert meta["genai"] == {"file": GENAI_CONFIG_FILE} and meta["files"][GENAI_CONFIG_FILE]
    for prompt in PROMPTS:
        assert_same_greedy(folder, prompt)


def test_genai_runs_the_tiny_preset_with_its_tokenizer(canonical):
    """The four lines of the README, text in and text out."""
    _, folder = canonical("tiny")
    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    prompt = "The default value is "
    ids = list(tokenizer.encode(prompt))
    session = Session(folder, backend="ort")
    assert ids == session.encode(prompt)
    expected = session.generate(prompt, max_new_tokens=24, stop_tokens=()).tokens[0]
    tokens = genai_greedy(folder, ids, 24)
    assert tokens == expected[: len(tokens)] and len(tokens) >= 1
    assert tokenizer.decode(tokens) == session.decode(tokens)


def test_genai_runs_an_optimized_folder(optimized_variant):
    """com.microsoft::QMoE experts and MatMulNBits linears, as `optimize --target ort-cpu` writes them."""
    _, _, folder = optimized_variant("tiny", target="ort-cpu", quantize_experts="int4", quantize_weights="int8")
    assert (folder / GENAI_CONFIG_FILE).is_file()
    for prompt in PROMPTS:
        assert_same_greedy(folder, prompt)


@pytest.mark.parametrize("variant", LATENT_VARIANTS)
def test_latent_attention_gets_no_genai_config_and_says_why(variant, hf_tiny_model):
    import moetrt

    cfg = moetrt.from_pretrained(hf_tiny_model(variant)).config
    config, reason = genai_config({"config": cfg.to_dict()})
    assert config is None and "latent" in reason and "key/value" in reason


def test_search_defaults_come_from_generation_config_and_context_bounds_max_length(canonical):
    _, folder = canonical("tiny")
    meta = json.loads((folder / "moetrt.json").read_text())
    config, _ = genai_config(meta, {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "max_length": 100_000,
                                    "eos_token_id": [2, 7]})
    search, model = config["search"], config["model"]
    assert search["do_sample"] is True and search["temperature"] == 0.7 and search["top_p"] == 0.9
    assert search["max_length"] == model["context_length"] == 512
    assert search["past_present_share_buffer"] is False  # present grows by Concat
    assert model["eos_token_id"] == [2, 7] and model["type"] == "qwen2"  # genai refuses "mixtral"
    written = json.loads((folder / GENAI_CONFIG_FILE).read_text())
    assert written["search"]["do_sample"] is False and written["model"]["eos_token_id"] == 2


@pytest.mark.parametrize("variant, says", [("qwen3_next", "recurrent_state"), ("gemma4_text", "differ")])
def test_state_genai_cannot_state_gets_no_genai_config_and_says_why(variant, says, hf_tiny_model):
    """A linear-attention layer's conv/recurrent state, and full layers with their own key/value heads and head dim."""
    import moetrt

    cfg = moetrt.from_pretrained(hf_tiny_model(variant)).config
    config, reason = genai_config({"config": cfg.to_dict()})
    assert config is None and says in reason, reason
