"""RoPE scaling (moetrt.rope) against transformers' own RoPE functions and modules.

For every type and several parameter sets: inv_freq and the attention scaling against
``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS``, cos/sin against transformers'
rotary module at positions below and above the original length; ``rope_scaling_from_hf`` on v4
and v5 config.json layouts; dynamic and yarn exported to ONNX and run in onnxruntime; errors.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from moetrt.errors import UnsupportedModelError
from moetrt.rope import ROPE_TYPES, RotaryEmbedding, canonical_rope_scaling, rope_scaling_from_hf

# NOTE: the reimplementation uses transformers' float32 ops in the same order, so results agree
# to the last bit today; 1e-6 relative leaves room for a reordering that is still float32-exact
# up to rounding. cos/sin are compared relative to their scale (max |value|), as they cross 0.
RTOL = 1e-6

# (id, rope_parameters without rope_theta, head_dim, rope_theta, max_position_embeddings)
CASES = [
    ("linear-2", {"rope_type": "linear", "factor": 2.0}, 32, 10000.0, 256),
    ("linear-4.5", {"rope_type": "linear", "factor": 4.5}, 64, 1e6, 512),
    ("dynamic-2", {"rope_type": "dynamic", "factor": 2.0}, 32, 10000.0, 256),
    ("dynamic-8", {"rope_type": "dynamic", "factor": 8.0}, 128, 5e5, 128),
    # gpt-oss (GptOssConfig's defaults)
    ("yarn-gpt-oss", {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                      "original_max_position_embeddings": 4096}, 64, 150000.0, 131072),
    # Qwen-style: only factor and the original length, the rest defaulted (truncate True)
    ("yarn-qwen", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, 128, 1e6, 131072),
    # DeepSeek-V3 style: mscale / mscale_all_dim (equal: attention factor 1), and unequal ones
    ("yarn-deepseek", {"rope_type": "yarn", "factor": 40.0, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                       "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096}, 64, 10000.0, 163840),
    ("yarn-mscale", {"rope_type": "yarn", "factor": 16.0, "mscale": 1.0, "mscale_all_dim": 0.5,
                     "original_max_position_embeddings": 256}, 32, 10000.0, 4096),
    ("yarn-attention-factor", {"rope_type": "yarn", "factor": 8.0, "attention_factor": 0.8, "beta_fast": 16.0,
                               "beta_slow": 2.0, "original_max_position_embeddings": 512}, 32, 50000.0, 4096),
    # factor derived from max_position_embeddings / original_max_position_embeddings
    ("yarn-no-factor", {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 1024}, 32, 10000.0,
     8192),
    # Llama 3.1 and 3.2
    ("llama3-8", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}, 128, 500000.0, 131072),
    ("llama3-32", {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}, 64, 500000.0, 131072),
    ("llama3-small", {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                      "original_max_position_embeddings": 64}, 32, 10000.0, 512),
]
IDS = [c[0] for c in CASES]


def _hf_config(params: dict, head_dim: int, theta: float, max_pos: int):
    rope = dict(params, rope_theta=theta)
    return transformers.LlamaConfig(
        hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=max_pos,
        rope_parameters=rope,
    )


def _ours(params: dict, head_dim: int, theta: float, max_pos: int) -> RotaryEmbedding:
    return RotaryEmbedding(head_dim, theta, params, max_position_embeddings=max_pos)


def _positions(max_pos: int, params: dict) -> list[torch.Tensor]:
    """Position batches [B, S] below, at and above the original length (the switch of dynamic)."""
    orig = params.get("original_max_position_embeddings") or max_pos
    switch = max_pos if params["rope_type"] == "dynamic" else orig
    below = torch.arange(17)[None]
    at = torch.stack([torch.arange(switch - 5, switch), torch.arange(5)])  # max + 1 == switch
    above = torch.stack([torch.arange(switch - 2, switch + 3), torch.arange(3 * switch, 3 * switch + 5)])
    decode = torch.tensor([[switch + 10]])
    return [below, at, above, decode]


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = want.abs().max().item() or 1.0
    err = (got.double() - want.double()).abs().max().item()
    assert err <= RTOL * scale, f"max error {err:.3g} > {RTOL} * {scale:.3g}"


@pytest.mark.parametrize("name,params,head_dim,theta,max_pos", CASES, ids=IDS)
def test_inv_freq_and_attention_scaling_match_transformers(name, params, head_dim, theta, max_pos):
    cfg = _hf_config(params, head_dim, theta, max_pos)
    ref_inv, ref_scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg)
    ours = _ours(params, head_dim, theta, max_pos)
    torch.testing.assert_close(ours.inv_freq, ref_inv, rtol=RTOL, atol=0)
    assert ours.attention_scaling == pytest.approx(ref_scaling, rel=RTOL)
    if params["rope_type"] == "yarn" and name != "yarn-deepseek":  # the cases are chosen to scale cos/sin
        assert ours.attention_scaling != 1.0


@pytest.mark.parametrize("name,params,head_dim,theta,max_pos", CASES, ids=IDS)
def test_cos_sin_match_transformers(name, params, head_dim, theta, max_pos):
    cfg = _hf_config(params, head_dim, theta, max_pos)
    ours = _ours(params, head_dim, theta, max_pos)
    x = torch.zeros(1)
    for pos in _positions(max_pos, params):
        ref = LlamaRotaryEmbedding(cfg)  # a fresh one per call: dynamic's state starts at the original length
        ref_cos, ref_sin = ref(x, pos)
        cos, sin = ours(pos, torch.float32)
        assert cos.shape == (*pos.shape, head_dim)
        _close(cos, ref_cos)
        _close(sin, ref_sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_oss_rotary_matches_transformers(dtype):
    cfg = transformers.GptOssConfig(head_dim=64, hidden_size=256, num_attention_heads=4, num_key_value_heads=1,
                                    rope_theta=150000.0)
    scaling = rope_scaling_from_hf(cfg.to_dict())
    assert scaling == {
        "rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": None, "mscale_all_dim": None, "attention_factor": 0.1 * math.log(32.0) + 1.0,
        "truncate": False,
    }
    ours = RotaryEmbedding(64, 150000.0, scaling, cfg.max_position_embeddings)
    ref = GptOssRotaryEmbedding(cfg)
    torch.testing.assert_close(ours.inv_freq, ref.inv_freq, rtol=RTOL, atol=0)
    pos = torch.stack([torch.arange(4090, 4110), torch.arange(20)])
    ref_cos, ref_sin = ref(torch.zeros(1, dtype=dtype), pos)  # gpt-oss: half-width cos/sin
    cos, sin = ours(pos, dtype)
    assert cos.dtype == dtype
    for got, want in ((cos, ref_cos), (sin, ref_sin)):
        torch.testing.assert_close(got[..., :32], want, rtol=0, atol=0)  # same fp32 ops, same cast
        torch.testing.assert_close(got[..., 32:], want, rtol=0, atol=0)


def test_plain_rope_is_unchanged():
    cfg = transformers.LlamaConfig(hidden_size=128, num_attention_heads=4, head_dim=32, rope_theta=1e6)
    ref = LlamaRotaryEmbedding(cfg)
    pos = torch.arange(50)[None]
    for scaling in (None, {}, {"rope_type": "default"}, {"rope_type": "default", "rope_theta": 1e6}):
        ours = RotaryEmbedding(32, 1e6, scaling)
        assert ours.scaling is None
        assert torch.equal(ours.inv_freq, ref.inv_freq)
        for got, want in zip(ours(pos, torch.float32), ref(torch.zeros(1), pos)):
            assert torch.equal(got, want)


def test_dynamic_switches_at_the_original_length():
    params = {"rope_type": "dynamic", "factor": 4.0}
    dyn, plain = RotaryEmbedding(32, 10000.0, params, 64), RotaryEmbedding(32, 10000.0)
    below = torch.arange(64)[None]  # max + 1 == 64: not beyond, plain frequencies
    assert all(torch.equal(a, b) for a, b in zip(dyn(below, torch.float32), plain(below, torch.float32)))
    above = torch.arange(65)[None]
    assert not torch.allclose(dyn(above, torch.float32)[0], plain(above, torch.float32)[0], atol=1e-3)


# ---- rope_scaling_from_hf -------------------------------------------------------------------

GPT_OSS_V4 = {  # gpt-oss-20b's config.json as published (transformers v4 layout)
    "max_position_embeddings": 131072, "rope_theta": 150000,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
}
DEEPSEEK_V4 = {  # DeepSeek-V3's rope_scaling ("type", not "rope_type")
    "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
}


def test_from_hf_v4_and_v5_layouts_agree():
    v5 = {"max_position_embeddings": 131072, "rope_parameters": dict(GPT_OSS_V4["rope_scaling"], rope_theta=150000)}
    assert rope_scaling_from_hf(GPT_OSS_V4) == rope_scaling_from_hf(v5)
    deepseek = rope_scaling_from_hf(DEEPSEEK_V4)
    assert deepseek == {
        "rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "attention_factor": 1.0, "truncate": True,
    }
    # transformers' own standardisation of the v4 dict computes the same frequencies
    cfg = transformers.DeepseekV3Config(rope_scaling=dict(DEEPSEEK_V4["rope_scaling"]), rope_theta=10000,
                                        max_position_embeddings=163840)
    ref_inv, ref_scaling = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    ours = RotaryEmbedding(cfg.qk_rope_head_dim, 10000, deepseek, 163840)
    torch.testing.assert_close(ours.inv_freq, ref_inv, rtol=RTOL, atol=0)
    assert ours.attention_scaling == ref_scaling


def test_from_hf_plain_rope_is_none():
    assert rope_scaling_from_hf({"rope_theta": 1e6}) is None
    assert rope_scaling_from_hf({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}) is None
    assert rope_scaling_from_hf({"rope_scaling": None, "rope_theta": 1e6}) is None
    assert rope_scaling_from_hf({"rope_scaling": {"type": "default"}}) is None


def test_from_hf_fills_defaults():
    hf = {"max_position_embeddings": 8192, "rope_scaling": {"type": "yarn", "factor": 4.0}}
    got = rope_scaling_from_hf(hf)
    assert got["original_max_position_embeddings"] == 8192  # transformers: the model's max length
    assert (got["beta_fast"], got["beta_slow"], got["truncate"]) == (32.0, 1.0, True)
    assert got["attention_factor"] == pytest.approx(0.1 * math.log(4.0) + 1.0)
    # a top-level original_max_position_embeddings (Phi-3 style) wins, as in transformers
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    hf = {"max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "rope_parameters": llama3}
    assert rope_scaling_from_hf(hf)["original_max_position_embeddings"] == 4096
    assert rope_scaling_from_hf({"rope_scaling": {"type": "linear", "factor": 2}}) == {"rope_type": "linear",
                                                                                      "factor": 2.0}
    # canonical dicts are fixed points
    for case in CASES:
        once = canonical_rope_scaling(case[1], case[4])
        assert canonical_rope_scaling(once, case[4]) == once


def test_from_hf_matches_transformers_config_round_trip():
    """config.to_dict() of a transformers config -> our dict -> the same frequencies as transformers."""
    for name, params, head_dim, theta, max_pos in CASES:
        cfg = _hf_config(params, head_dim, theta, max_pos)
        ours = RotaryEmbedding(head_dim, theta, rope_scaling_from_hf(cfg.to_dict()), max_pos)
        ref_inv, ref_scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg)
        torch.testing.assert_close(ours.inv_freq, ref_inv, rtol=RTOL, atol=0, msg=name)
        assert ours.attention_scaling == pytest.approx(ref_scaling, rel=RTOL), name


# ---- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("factor,partial", [(1.0, 0.25), (1.0, 1.0), (2.0, 0.5), (1.0, 0.1)])
def test_proportional_matches_transformers(factor, partial):
    """Gemma 4's full-attention RoPE: a share of the plain frequencies over the whole head, the rest zero."""
    params = {"rope_type": "proportional", "partial_rotary_factor": partial, "factor": factor}
    cfg = _hf_config(params, 64, 1e6, 4096)
    ref_inv, ref_scaling = ROPE_INIT_FUNCTIONS["proportional"](cfg)
    ours = RotaryEmbedding(64, 1e6, params)
    torch.testing.assert_close(ours.inv_freq, ref_inv, rtol=0, atol=0)
    assert ours.attention_scaling == ref_scaling == 1.0


def test_generic_longrope_without_mscales_is_refused():
    """moetrt implements PhiMoE's longrope (both mscales); Phi-3's generic form is refused by name."""
    hf = {"rope_scaling": {"type": "longrope", "factor": 2.0, "short_factor": [1.0], "long_factor": [1.0]}}
    with pytest.raises(UnsupportedModelError, match="longrope without short_mscale and long_mscale"):
        rope_scaling_from_hf(hf)


@pytest.mark.parametrize("rope_type", ["mrope", "su"])
def test_unsupported_type_names_it_and_the_supported_ones(rope_type):
    hf = {"rope_scaling": {"type": rope_type, "factor": 2.0, "short_factor": [1.0], "long_factor": [1.0]}}
    with pytest.raises(UnsupportedModelError, match=rope_type) as info:
        rope_scaling_from_hf(hf)
    assert all(t in str(info.value) for t in ROPE_TYPES)
    with pytest.raises(UnsupportedModelError, match=rope_type):
        RotaryEmbedding(32, 10000.0, {"rope_type": rope_type})


@pytest.mark.parametrize("scaling,unknown", [
    ({"rope_type": "linear", "factor": 2.0, "beta_fast": 32}, "beta_fast"),
    ({"rope_type": "yarn", "factor": 4.0, "mrope_section": [8, 8]}, "mrope_section"),
    ({"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 128}, "original_max_position"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "mscale": 1.0},
     "mscale"),
    ({"rope_type": "default", "factor": 2.0}, "factor"),
])
def test_unknown_parameter_is_refused(scaling, unknown):
    with pytest.raises(UnsupportedModelError, match=unknown):
        rope_scaling_from_hf({"max_position_embeddings": 4096, "rope_parameters": scaling})


@pytest.mark.parametrize("hf,rotary_dim", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "partial_rotary_factor": 0.5,
                          "original_max_position_embeddings": 64}}, 8),
    ({"partial_rotary_factor": 0.25}, 4),
    ({"rotary_dim": 8}, 8),
], ids=["rope_parameters", "top-level", "rotary_dim"])
def test_partial_rotary_only_where_the_family_rotates_part_of_a_head(hf, rotary_dim):
    """Partial RoPE becomes rotary_dim for families whose transformers code has it, and is refused elsewhere."""
    from moetrt.families._base import rope

    hf = {"model_type": "mixtral", "max_position_embeddings": 4096, "hidden_size": 64, "num_attention_heads": 4,
          "head_dim": 16, **hf}
    with pytest.raises(UnsupportedModelError, match="partial_rotary_factor"):
        rope(hf, 1e4)
    assert rope(hf, 1e4, partial=True)["rotary_dim"] == rotary_dim


def test_per_layer_rope_is_refused():
    hf = {"layer_types": ["full_attention", "sliding_attention"],
          "rope_parameters": {"full_attention": {"rope_type": "default"},
                              "sliding_attention": {"rope_type": "default"}}}
    with pytest.raises(UnsupportedModelError, match="per layer type"):
        rope_scaling_from_hf(hf)


@pytest.mark.parametrize("scaling,max_pos,match", [
    ({"rope_type": "linear"}, None, "factor"),
    ({"rope_type": "linear", "factor": "2"}, None, "factor"),
    ({"rope_type": "linear", "factor": -1.0}, None, "factor"),
    ({"rope_type": "dynamic", "factor": 2.0}, None, "max_position_embeddings"),
    ({"rope_type": "yarn", "factor": 4.0}, None, "original_max_position_embeddings"),
    ({"rope_type": "yarn", "original_max_position_embeddings": 64}, None, "factor"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "truncate": "no"}, None, "truncate"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 2.0,
      "original_max_position_embeddings": 64}, None, "must differ"),
    ({"rope_type": "yarn", "type": "linear", "factor": 2.0}, 128, "two types"),
    ({"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}, None, "rope_theta"),
])
def test_bad_values_raise_value_error(scaling, max_pos, match):
    with pytest.raises(ValueError, match=match):
        RotaryEmbedding(32, 10000.0, scaling, max_pos)


# ---- export ---------------------------------------------------------------------------------


class _Rope(torch.nn.Module):
    def __init__(self, scaling, max_pos):
        super().__init__()
        self.rotary = RotaryEmbedding(16, 10000.0, scaling, max_pos)

    def forward(self, position_ids):
        return self.rotary(position_ids, torch.float32)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "dynamic", "factor": 4.0},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32},
], ids=["dynamic", "yarn"])
def test_export_runs_in_onnxruntime(scaling, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    module = _Rope(scaling, 32).eval()
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    path = tmp_path / "rope.onnx"
    with torch.no_grad():
        torch.onnx.export(module, (torch.arange(6)[None].repeat(2, 1),), str(path), dynamo=True,
                          dynamic_shapes=({0: batch, 1: seq},), input_names=["position_ids"],
                          output_names=["rope_cos", "rope_sin"], verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    plain = RotaryEmbedding(16, 10000.0)
    below, above = torch.arange(10)[None], torch.stack([torch.arange(40), torch.arange(100, 140)])
    decode = torch.tensor([[31]]), torch.tensor([[32]]), torch.tensor([[70], [3]])
    for pos in (below, above, *decode):
        want = module(pos)
        got = session.run(None, {"position_ids": pos.numpy()})
        for g, w in zip(got, want):
            # NOTE: onnxruntime's Cos/Sin/Pow differ from torch's by float32 ulps of angles up to 140 rad
            torch.testing.assert_close(torch.from_numpy(g), w, rtol=0, atol=2e-5)
    if scaling["rope_type"] == "dynamic":  # the positions above the switch really use other frequencies
        assert not torch.allclose(module(above)[0], plain(above, torch.float32)[0], atol=1e-3)
        assert torch.equal(module(below)[0], plain(below, torch.float32)[0])


def test_dynamic_frequencies_stay_float32_in_a_half_module():
    """Cast to fp16 (as a fp16 export casts the model), the NTK frequencies are still computed in float32."""
    params = {"rope_type": "dynamic", "factor": 4.0}
    full = RotaryEmbedding(32, 10000.0, params, 64)
    half = RotaryEmbedding(32, 10000.0, params, 64).to(torch.float16)
    above = torch.arange(200)[None]
    for got, want in zip(half(above, torch.float16), full(above, torch.float16)):
        assert torch.equal(got, want)
