"""FP8 block-quantized checkpoints (DeepSeek-V3 / Kimi-K2 layout): exact dequantization, loading, streaming.

Dequantization is compared bit for bit with transformers (its load path ``Fp8Dequantize`` where the
blocks divide the shape, its FP8 linear's ``_dequantize_fp8_weight`` for partial edge blocks, and
an elementwise reading of the definition); quantization bit for bit with transformers'
``Fp8Quantize``. Tiny models saved as FP8 load to exactly the weights transformers dequantizes,
give transformers' logits, stream into the same export, and record the source format.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import FineGrainedFP8Config
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize, _dequantize_fp8_weight

import moetrt
from moetrt.checkpoint import checkpoint_sources
from moetrt.errors import CheckpointError, UnsupportedModelError
from moetrt.fp8 import FP8_DTYPE, FP8Scheme, dequantize_fp8_blocks, quantize_fp8_blocks, scale_name, scale_shape
from tests.hf_tiny import hf_forward, hf_tiny_model, rel_err, save_fp8_checkpoint

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (weight shape [..., N, K], block): the blocks divide the shape
DIVIDING = [((64, 96), (16, 32)), ((3, 32, 48), (16, 16)), ((256, 128), (128, 128)), ((5, 7), (5, 7))]
# partial edge blocks: DeepSeek-V3's kv_a_proj_with_mqa (576 rows in blocks of 128), smaller ones
PARTIAL = [((576, 200), (128, 128)), ((2, 40, 72), (16, 32)), ((17, 5), (4, 8)), ((1, 3), (128, 128))]
PROMPT = [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def _bits(t: torch.Tensor) -> torch.Tensor:
    # compare as integers: NaN == NaN (same payload), and -0.0 != +0.0
    return t.contiguous().view(_BITS[t.element_size()])


def _random_fp8(shape, block, seed):
    """Random FP8 bytes (every pattern, NaN 0x7F/0xFF included) and scales spanning float32's range."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 256, shape, dtype=torch.int32, generator=g).to(torch.uint8).view(FP8_DTYPE)
    exponents = torch.randint(-60, 40, scale_shape(shape, block), generator=g).float()
    scale = torch.rand(exponents.shape, generator=g) * torch.exp2(exponents)
    return q, scale


def _elementwise(q, scale, block):
    """The definition, one index at a time: float32(q[n, k]) * scale[n // bn, k // bk]."""
    rows = torch.arange(q.shape[-2]) // block[0]
    cols = torch.arange(q.shape[-1]) // block[1]
    return q.float() * scale[..., rows, :][..., :, cols]


def test_every_fp8_byte_matches_transformers():
    q = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8_DTYPE).reshape(16, 16)
    scale = torch.tensor([[2.0**-20, 3.0], [1.0, 2.0**30]])
    got = dequantize_fp8_blocks(q, scale, (8, 8))
    ref = Fp8Dequantize(None)._dequantize_one(q, scale, output_dtype=torch.float32)
    assert torch.equal(_bits(got), _bits(ref))
    assert int(torch.isnan(got).sum()) == 2  # 0x7F and 0xFF are e4m3fn's NaNs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,block", DIVIDING)
def test_dequantize_matches_transformers_load_path(shape, block, dtype):
    q, scale = _random_fp8(shape, block, seed=sum(shape))
    got = dequantize_fp8_blocks(q, scale, block, dtype)
    assert got.dtype == dtype and got.shape == shape
    ref = Fp8Dequantize(None)._dequantize_one(q, scale, output_dtype=dtype)
    assert torch.equal(_bits(got), _bits(ref))


@pytest.mark.parametrize("shape,block", PARTIAL + DIVIDING)
def test_partial_blocks_match_transformers_linear_path_and_the_definition(shape, block):
    q, scale = _random_fp8(shape, block, seed=7 + sum(shape))
    got = dequantize_fp8_blocks(q, scale, block)
    assert torch.equal(_bits(got), _bits(_dequantize_fp8_weight(q, scale, list(block), torch.float32)))
    assert torch.equal(_bits(got), _bits(_elementwise(q, scale, block)))


def test_scale_grid_of_partial_blocks():
    assert scale_shape((576, 7168)) == (5, 56)  # DeepSeek-V3 kv_a_proj_with_mqa
    assert scale_shape((8, 2048, 7168)) == (8, 16, 56)  # stacked experts
    assert scale_shape((17, 5), (4, 8)) == (5, 1)


@pytest.mark.parametrize("shape,block", DIVIDING)
def test_quantize_matches_transformers(shape, block):
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-8, 8, shape, generator=g).float())
    w[..., : block[0], : block[1]] = 0.0  # an all-zero block: scale 1
    q, scale = quantize_fp8_blocks(w, block)
    config = FineGrainedFP8Config(weight_block_size=block)
    ref = Fp8Quantize(type("Quantizer", (), {"quantization_config": config})())._quantize_one("x.weight", w)
    assert torch.equal(_bits(q), _bits(ref["x.weight"]))
    assert torch.equal(_bits(scale), _bits(ref["x.weight_scale_inv"]))
    assert scale.dtype == torch.float32 and q.dtype == FP8_DTYPE


@pytest.mark.parametrize("shape,block", PARTIAL + DIVIDING)
def test_round_trip_within_half_an_fp8_step(shape, block):
    g = torch.Generator().manual_seed(3 + sum(shape))
    w = torch.randn(shape, generator=g)
    q, scale = quantize_fp8_blocks(w, block)
    assert tuple(scale.shape) == scale_shape(shape, block)
    back = dequantize_fp8_blocks(q, scale, block)
    step = _elementwise(torch.ones_like(q), scale, block)  # each value's block scale
    # e4m3: 3 mantissa bits (half a step is 2**-4 relative), subnormals below 2**-6 in steps of 2**-9
    bound = torch.maximum(w.abs() * 2.0**-4, step * 2.0**-10)
    # NOTE: 1e-6 relative slack: w * scale and 1 / scale are each rounded once in float32
    assert bool(((back - w).abs() <= bound * (1 + 1e-6)).all())
    # each block's largest magnitude maps to 448 (the largest e4m3 value), within rounding
    blocks_amax = _elementwise(q, torch.ones_like(scale), block).abs().amax()
    assert float(blocks_amax) == 448.0


def test_values_on_the_grid_round_trip_exactly():
    g = torch.Generator().manual_seed(0)
    block = (16, 16)
    q = torch.randint(-448, 449, (40, 24), generator=g).float().to(FP8_DTYPE)  # e4m3 values
    q[0::16, 0::16] = 448.0  # every block (partial ones too) holds 448: its scale is exactly the power of two
    scale = torch.exp2(torch.randint(-10, 10, scale_shape(q.shape, block), generator=g).float())
    q2, scale2 = quantize_fp8_blocks(dequantize_fp8_blocks(q, scale, block), block)
    assert torch.equal(_bits(q2), _bits(q)) and torch.equal(scale2, scale)


@pytest.mark.parametrize("weight,scale,block,match", [
    (torch.zeros(32, 32, dtype=FP8_DTYPE), torch.ones(2, 3), (16, 16), r"expected \[2, 2\]"),
    (torch.zeros(3, 40, 72, dtype=FP8_DTYPE), torch.ones(40, 72), (16, 32), r"expected \[3, 3, 3\]"),
    (torch.zeros(32, 32), torch.ones(2, 2), (16, 16), "must be a torch.float8_e4m3fn tensor"),
    (torch.zeros(32, 32, dtype=torch.float8_e5m2), torch.ones(2, 2), (16, 16), "must be a torch.float8_e4m3fn"),
    (torch.zeros(32, 32, dtype=FP8_DTYPE), torch.ones(2, 2, dtype=torch.uint8), (16, 16), "must be a float32"),
    (torch.zeros(32, dtype=FP8_DTYPE), torch.ones(1), (16, 16), r"shape \[\.\.\., N, K\]"),
])
def test_dequantize_refuses_what_is_not_fp8_blocks(weight, scale, block, match):
    with pytest.raises(CheckpointError, match=match):
        dequantize_fp8_blocks(weight, scale, block)


@pytest.mark.parametrize("call", [
    lambda: dequantize_fp8_blocks(torch.zeros(4, 4, dtype=FP8_DTYPE), torch.ones(1, 1), (0, 4)),
    lambda: dequantize_fp8_blocks(torch.zeros(4, 4, dtype=FP8_DTYPE), torch.ones(1, 1), (4, 4), torch.int8),
    lambda: quantize_fp8_blocks(torch.tensor([[1.0, float("inf")]]), (1, 2)),
    lambda: quantize_fp8_blocks(torch.zeros(4), (1, 2)),
    lambda: quantize_fp8_blocks(torch.zeros(4, 4, dtype=torch.int32), (2, 2)),
])
def test_bad_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_scale_names_follow_transformers():
    assert scale_name("model.layers.0.self_attn.q_proj.weight") == "model.layers.0.self_attn.q_proj.weight_scale_inv"
    assert scale_name("model.layers.0.mlp.experts.gate_up_proj") == "model.layers.0.mlp.experts.gate_up_proj_scale_inv"


# ---- checkpoints ---------------------------------------------------------------------------------
CHECKPOINTS = [("mixtral", (16, 16)), ("mixtral", (128, 128)), ("qwen3_moe", (16, 32))]


@pytest.fixture(scope="module")
def hf_models():
    return {v: hf_tiny_model(v) for v in ("mixtral", "qwen3_moe", "qwen2_moe-shared")}


def _assert_same_weights(model, reference):
    ref = moetrt.from_pretrained(reference).state_dict()  # transformers' names mapped to moetrt's
    for name, param in model.state_dict().items():
        assert torch.equal(_bits(param), _bits(ref[name])), name


def _logits_match(model, reference):
    ids = torch.tensor(PROMPT)
    ref_logits, _ = hf_forward(reference, ids)
    with torch.no_grad():
        # NOTE: both fp32 from the same weights; 1e-5 covers the different summation orders of two codes
        assert rel_err(model(ids).logits, ref_logits) <= 1e-5


@pytest.mark.parametrize("variant,block", CHECKPOINTS)
def test_fp8_checkpoint_loads_to_transformers_dequantized_weights(hf_models, tmp_path, variant, block):
    folder = tmp_path / "fp8"
    reference = save_fp8_checkpoint(hf_models[variant], folder, block)
    stored = load_file(str(folder / "model.safetensors"))
    fp8 = [n for n, t in stored.items() if t.dtype == FP8_DTYPE]
    assert fp8 and all(scale_name(n) in stored for n in fp8)
    assert not any(t.dtype == FP8_DTYPE for n, t in stored.items() if "norm" in n or "embed" in n or n == "lm_head.weight")
    model = moetrt.from_pretrained(folder)
    _assert_same_weights(model, reference)
    _logits_match(model, reference)
    assert model.config.extra["source_quantization"] == FP8Scheme(block).record(len(fp8))
    assert model.config.extra["source_quantization"]["weight_block_size"] == list(block)


def test_partial_edge_blocks_load_exactly(hf_models, tmp_path):
    # blocks of 24 x 40 divide none of 64, 56 (dense/shared F), 32 (k/v rows): every edge block is partial
    folder = tmp_path / "fp8"
    reference = save_fp8_checkpoint(hf_models["qwen2_moe-shared"], folder, (24, 40))
    model = moetrt.from_pretrained(folder, dtype=torch.bfloat16)
    ref = moetrt.from_pretrained(reference).state_dict()
    for name, param in model.state_dict().items():  # float32 products rounded once to bf16, as transformers does
        assert torch.equal(_bits(param), _bits(ref[name].to(torch.bfloat16))), name


@pytest.mark.parametrize("variant,block", CHECKPOINTS)
def test_transformers_loading_the_same_fp8_folder_agrees(hf_models, tmp_path, variant, block):
    pytest.importorskip("accelerate", reason="transformers loads FP8 checkpoints only with accelerate installed")
    import transformers

    folder = tmp_path / "fp8"
    save_fp8_checkpoint(hf_models[variant], folder, block)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=FineGrainedFP8Config(dequantize=True), dtype=torch.float32,
        attn_implementation="eager", experts_implementation="eager").eval()
    model = moetrt.from_pretrained(folder)
    _assert_same_weights(model, hf)
    _logits_match(model, hf)


def test_stacked_experts_in_fp8_read_with_their_scale_inv(hf_models, tmp_path):
    # transformers v5's in-memory layout (experts.gate_up_proj [E, 2F, D]) with X_scale_inv beside X
    hf_model = hf_models["qwen3_moe"]
    folder = tmp_path / "stacked"
    save_fp8_checkpoint(hf_model, folder, (16, 16))
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    expected = {}
    for name in [n for n in state if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        q, scale = quantize_fp8_blocks(state[name], (16, 16))
        state[name], state[scale_name(name)] = q, scale
        expected[name] = dequantize_fp8_blocks(q, scale, (16, 16))
    save_file(state, str(folder / "model.safetensors"))
    model = moetrt.from_pretrained(folder)
    for name, values in expected.items():
        assert torch.equal(model.state_dict()[name.removeprefix("model.")], values), name
    assert model.config.extra["source_quantization"]["tensors"] == len(expected)


def test_fp8_checkpoint_streams_into_the_same_export(hf_models, tmp_path):
    from moetrt.artifact import read_metadata
    from moetrt.export import onnx_from_torch

    folder = tmp_path / "fp8"
    save_fp8_checkpoint(hf_models["mixtral"], folder, (16, 16))
    streamed = onnx_from_torch(folder, tmp_path / "streamed", progress=False, external_data=True)
    in_memory = onnx_from_torch(moetrt.from_pretrained(folder), tmp_path / "memory", progress=False,
                                external_data=True, streaming=False)
    assert (streamed / "model.onnx.data").read_bytes() == (in_memory / "model.onnx.data").read_bytes()
    for out in (streamed, in_memory):
        record = read_metadata(out)["config"]["extra"]["source_quantization"]
        assert record["quant_method"] == "fp8" and record["fmt"] == "e4m3"
        assert record["weight_block_size"] == [16, 16] and record["tensors"] > 0


# ---- bad checkpoints -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp8_folder(hf_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp8") / "mixtral"
    save_fp8_checkpoint(hf_models["mixtral"], folder, (16, 16))
    return folder


def _copy(folder, tmp_path):
    import shutil

    return shutil.copytree(folder, tmp_path / "ckpt")


def _edit_quantization(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _edit_tensors(folder, edit):
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def _both_refuse(folder, error, match):
    for call in (moetrt.from_pretrained, checkpoint_sources):
        with pytest.raises(error, match=match):
            call(folder)


WEIGHT = "model.layers.1.self_attn.k_proj.weight"
EXPERT = "model.layers.2.block_sparse_moe.experts.3.w2.weight"


@pytest.mark.parametrize("changes,error,match", [
    ({"fmt": "e5m2"}, UnsupportedModelError, r"fmt 'e5m2' is not supported.*'e4m3'"),
    ({"activation_scheme": "static"}, UnsupportedModelError, r"activation_scheme 'static' is not supported"),
    ({"activation_scheme": "dynamc"}, CheckpointError, r"activation_scheme 'dynamc' is invalid; allowed: 'dynamic'"),
    ({"scale_fmt": "ue8m0"}, UnsupportedModelError, r"scale_fmt 'ue8m0' is not supported"),
    ({"weight_block_size": None}, UnsupportedModelError, r"weight_block_size null"),
    ({"weight_block_size": [16]}, CheckpointError, r"weight_block_size \[16\] is invalid"),
    ({"weight_block_size": [32, 32]}, CheckpointError,
     r"scale .* has shape \(\d+, \d+\), but weight .* in blocks of \[32, 32\] needs .*weight_block_size and the weights disagree"),
])
def test_unreadable_quantization_configs_are_refused(fp8_folder, tmp_path, changes, error, match):
    folder = _copy(fp8_folder, tmp_path)
    _edit_quantization(folder, **changes)
    _both_refuse(folder, error, match)


@pytest.mark.parametrize("name", [WEIGHT, EXPERT])
def test_a_weight_without_its_scale_is_refused(fp8_folder, tmp_path, name):
    folder = _copy(fp8_folder, tmp_path)
    _edit_tensors(folder, lambda t: t.pop(scale_name(name)))
    _both_refuse(folder, CheckpointError, rf"missing.*{scale_name(name).removeprefix('model.')}|missing.*{scale_name(name)}")


def test_a_scale_whose_shape_does_not_match_the_blocks_is_refused(fp8_folder, tmp_path):
    folder = _copy(fp8_folder, tmp_path)
    _edit_tensors(folder, lambda t: t.__setitem__(scale_name(EXPERT), torch.ones(4, 4)))
    _both_refuse(folder, CheckpointError, rf"{scale_name(EXPERT)}' has shape \(4, 4\), but weight .* needs \(4, 3\)")


def test_a_scale_without_its_weight_is_refused(fp8_folder, tmp_path):
    folder = _copy(fp8_folder, tmp_path)
    _edit_tensors(folder, lambda t: t.__setitem__(WEIGHT, t[WEIGHT].float()))  # the weight unquantized, its scale left
    _both_refuse(folder, CheckpointError, rf"no place.*{scale_name(WEIGHT)}")


def test_fp8_tensors_without_an_fp8_quantization_config_are_refused(fp8_folder, tmp_path):
    folder = _copy(fp8_folder, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    _both_refuse(folder, CheckpointError, r"stored as torch.float8_e4m3fn, but config.json has no quantization_config")


def test_e5m2_tensors_are_refused(fp8_folder, tmp_path):
    folder = _copy(fp8_folder, tmp_path)
    _edit_tensors(folder, lambda t: t.__setitem__(WEIGHT, t[WEIGHT].float().to(torch.float8_e5m2)))
    _both_refuse(folder, UnsupportedModelError, r"stored as torch.float8_e5m2; moetrt reads FP8 weights in")


def test_scales_of_skipped_tensors_are_skipped_with_them(tmp_path):
    # DeepSeek-V3 releases hold their multi-token-prediction layer in FP8 too; transformers skips it
    folder = tmp_path / "fp8"
    reference = save_fp8_checkpoint(hf_tiny_model("deepseek_v3"), folder, (16, 16))
    config = json.loads((folder / "config.json").read_text())
    mtp = config["num_hidden_layers"]
    config["num_nextn_predict_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    q, scale = quantize_fp8_blocks(torch.randn(64, 64), (16, 16))
    _edit_tensors(folder, lambda t: t.update({f"model.layers.{mtp}.self_attn.o_proj.weight": q,
                                              f"model.layers.{mtp}.self_attn.o_proj.weight_scale_inv": scale}))
    with pytest.warns(UserWarning, match="skipped 2 tensor"):
        checkpoint_sources(folder)
    with pytest.warns(UserWarning, match="skipped 2 tensor"):
        model = moetrt.from_pretrained(folder)
    _assert_same_weights(model, reference)
