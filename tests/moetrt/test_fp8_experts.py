"""FP8 e4m3 experts on the CPU: the NumPy reference against torch's casts, FP8Experts, the torch back end's option.

The reference (``moetrt.fp8``): every one of the 256 codes decodes as torch's float8_e4m3fn, and
encoding matches torch's cast bit for bit on random data over 2^-20..2^12, at every rounding
midpoint and one float32 step either side of it, past 448 (saturation), for infinities, NaN and
-0.0; block quantization matches ``quantize_fp8_blocks`` (transformers' recipe) bit for bit. The
torch face of FP8Experts matches the float64 reference from the same bytes. A model's experts
swap to FP8 in place (dtypes kept through ``model.to``), an FP8 checkpoint's expert bytes and
scales are taken as stored, and what cannot run is refused with one line. The kernels themselves
are checked in ``tests/moetrt/kernels/test_kernels_fp8_*.py``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import moetrt
import moetrt.fp8
from moetrt.errors import MoetrtError
from moetrt.fp8 import (
    FP8_DTYPE,
    FP8Experts,
    check_fp8_device,
    e4m3_from_float32,
    e4m3_to_float32,
    fp8_experts,
    quantize_fp8_blocks,
    quantize_fp8_blocks_reference,
    sparse_moe_fp8_reference,
    sparse_moe_fp8_torch,
    weight_block,
)
from moetrt.model import MoETransformer
from moetrt.runtime import Session
from moetrt.ops.kernels.configs import fp8_block_k
from tests.hf_tiny import hf_tiny_model, save_fp8_checkpoint

# (shape [..., N, K], block): dividing, partial edge blocks, per token (1, K), per channel, DeepSeek's (1, 128)
BLOCKS = [((64, 96), (16, 32)), ((3, 40, 72), (16, 32)), ((576, 200), (128, 128)), ((7, 200), (1, 200)),
          ((7, 200), (1, 128)), ((2, 48, 64), (1, 64))]  # fmt: skip
# NOTE: the torch face and the reference take the same bytes and scales; float32 sums against float64
# ones (<= 96 terms), and h rounded to float32 before its quantization (a sum on the other side of an
# e4m3 rounding boundary moves one element of h by 2^-4): relative Frobenius error of y.
FP8_TORCH_RTOL = 1e-4
# NOTE: e4m3 keeps 3 mantissa bits: x, both weights and h each rounded by up to 2^-4 relative; over a
# 3-layer tiny model the logits move by a few percent of their spread.
FP8_LOGITS_RTOL = 0.1


def _codes(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint8).numpy()


def _torch_codes(values: np.ndarray) -> np.ndarray:
    return _codes(torch.from_numpy(np.ascontiguousarray(values, np.float32)).to(FP8_DTYPE))


def _rel_fro(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


def test_every_code_decodes_as_torch():
    codes = np.arange(256, dtype=np.uint8)
    ours = e4m3_to_float32(codes)
    theirs = torch.from_numpy(codes).view(FP8_DTYPE).float().numpy()
    assert np.array_equal(np.isnan(ours), np.isnan(theirs)) and np.isnan(ours).sum() == 2  # 0x7F, 0xFF
    assert np.array_equal(ours[~np.isnan(ours)].view(np.uint32), theirs[~np.isnan(theirs)].view(np.uint32))
    assert np.array_equal(e4m3_from_float32(ours), torch.from_numpy(codes).numpy() | 0)  # every code round-trips


def test_encoding_matches_torch_bit_for_bit():
    g = np.random.default_rng(0)
    random = (g.standard_normal(200_000) * np.exp2(g.integers(-20, 12, 200_000))).astype(np.float32)
    finite = np.unique(np.abs(e4m3_to_float32(np.arange(0x7F, dtype=np.uint8))))  # 0 .. 448
    mids = ((finite[1:].astype(np.float64) + finite[:-1]) / 2).astype(np.float32)  # ties: round to even
    special = np.array([448, 449, 463.9, 464, 464.1, 479, 480, 1e6, 3e38, np.inf, 2.0**-10, 3 * 2.0**-11, 2.0**-30,
                        0.0, np.nan], np.float32)  # fmt: skip
    values = np.concatenate([random, mids, np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(1e9)),
                             special])  # fmt: skip
    values = np.concatenate([values, -values])
    ours, theirs = e4m3_from_float32(values), _torch_codes(values)
    assert np.array_equal(ours, theirs), values[ours != theirs][:10]
    assert set(ours[np.isinf(values)].tolist()) == {0x7E, 0xFE}  # saturating: ±inf -> ±448
    assert e4m3_from_float32(np.float32(-0.0)) == 0x80 and e4m3_from_float32(np.float32(-np.nan)) == 0xFF


@pytest.mark.parametrize("shape,block", BLOCKS)
def test_block_quantization_matches_torch(shape, block):
    g = torch.Generator().manual_seed(len(shape) * 100 + block[1])
    w = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-12, 8, shape[:-1] + (1,), generator=g).float())
    q, scale = quantize_fp8_blocks(w, block)
    ref_q, ref_scale = quantize_fp8_blocks_reference(w.numpy(), block)
    assert np.array_equal(_codes(q), ref_q)
    assert np.array_equal(scale.numpy().view(np.uint32), ref_scale.view(np.uint32))


@pytest.mark.parametrize("weight_scales,activation_scales,block", [
    ("block", "token", (32, 32)), ("channel", "block", (32, 32)), ("block", "block", (16, 64)),
])  # fmt: skip
def test_torch_face_matches_reference(weight_scales, activation_scales, block):
    g = torch.Generator().manual_seed(7)
    tokens, dim, ffn, experts, k = 11, 96, 64, 5, 2
    x = torch.randn(tokens, dim, generator=g)
    w_gate_up, w_down = torch.randn(experts, 2 * ffn, dim, generator=g) * 0.1, torch.randn(experts, dim, ffn, generator=g) * 0.1
    weights, indices = torch.softmax(torch.randn(tokens, experts, generator=g), -1).topk(k)
    gub = weight_block(weight_scales, tuple(w_gate_up.shape), block)
    db = weight_block(weight_scales, tuple(w_down.shape), block)
    (wgu, sgu), (wd, sd) = quantize_fp8_blocks(w_gate_up, gub), quantize_fp8_blocks(w_down, db)
    y = sparse_moe_fp8_torch(x, weights, indices, wgu, sgu, wd, sd, gub, db, activation_scales, block)
    ref = sparse_moe_fp8_reference(x.numpy(), weights.numpy(), indices.numpy(), _codes(wgu), sgu.numpy(), _codes(wd),
                                   sd.numpy(), gub, db, activation_scales, block)
    assert _rel_fro(y.numpy(), ref) <= FP8_TORCH_RTOL


def test_model_experts_swap_to_fp8_in_place():
    model = moetrt.from_pretrained("tiny")  # the trained tiny model: real activations, not noise
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    gate_up = model.layers[0].mlp.experts.gate_up_proj.detach().clone()  # [E, 2F, D]
    with torch.no_grad():
        before = model(ids).logits
        counts = fp8_experts(model, "block", "token", block=(32, 32))
        after = model(ids).logits
    q, scale = quantize_fp8_blocks(gate_up, (32, 32))  # the whole tensor at once: the same bytes
    assert np.array_equal(_codes(model.layers[0].mlp.experts.w_gate_up), _codes(q))
    assert torch.equal(model.layers[0].mlp.experts.s_gate_up, scale)
    moe_layers = sum(1 for m in model.modules() if isinstance(m, FP8Experts))
    assert counts == {"from_checkpoint": 0, "quantized": moe_layers} and moe_layers > 0
    err = _rel_fro(after.numpy(), before.numpy())
    assert 1e-4 < err <= FP8_LOGITS_RTOL, err
    model.to(torch.bfloat16)
    experts = next(m for m in model.modules() if isinstance(m, FP8Experts))
    assert experts.w_gate_up.dtype == FP8_DTYPE and experts.s_gate_up.dtype == torch.float32
    assert "e4m3" in repr(experts) and fp8_experts(model) == {"from_checkpoint": 0, "quantized": 0}  # already FP8


def test_fp8_checkpoint_bytes_go_in_unchanged(tmp_path):
    block = (32, 32)
    save_fp8_checkpoint(hf_tiny_model("mixtral", intermediate_size=64), tmp_path, block)
    # halve every expert code and double its scale: the same values, but bytes a requantization would
    # not give back (it maps each block's amax to 448), so only the stored bytes can pass
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    for name in [n for n in tensors if ".experts." in n and tensors[n].dtype == FP8_DTYPE]:
        tensors[name] = (tensors[name].float() / 2).to(FP8_DTYPE)
        tensors[name + "_scale_inv"] = tensors[name + "_scale_inv"] * 2
    save_file(tensors, str(path), metadata={"format": "pt"})
    model = moetrt.from_pretrained(tmp_path)
    counts = fp8_experts(model, checkpoint=tmp_path)
    assert counts == {"from_checkpoint": 3, "quantized": 0}
    for layer in range(3):
        experts = model.layers[layer].mlp.experts
        stored = lambda e, w: tensors[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"]  # noqa: E731
        gate_up = torch.stack([torch.cat([stored(e, "w1"), stored(e, "w3")]) for e in range(6)])
        assert np.array_equal(_codes(experts.w_gate_up), _codes(gate_up))
        assert np.array_equal(_codes(experts.w_down), _codes(torch.stack([stored(e, "w2") for e in range(6)])))
        assert experts.gate_up_block == experts.down_block == block
        assert int((_codes(experts.w_gate_up) & 0x7F).max()) < 0x7E  # halved: no code reaches 448


def test_what_cannot_run_is_refused(monkeypatch):
    with pytest.raises(MoetrtError, match=r"runs on NVIDIA GPUs .* got device='cpu'; use device='cuda'"):
        Session("tiny", device="cpu", expert_precision="fp8")
    with pytest.raises(MoetrtError, match="expert_precision 'int4' is not one of"):
        Session("tiny", expert_precision="int4")
    with pytest.raises(MoetrtError, match="fp8_weight_scales 'tensor' is not one of"):
        Session("tiny", expert_precision="fp8", fp8_weight_scales="tensor")
    with pytest.raises(MoetrtError, match="expert_precision is an option of backend='torch'"):
        Session("unused-folder", backend="ort", expert_precision="fp8")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(MoetrtError, match=r"NVIDIA A100 is 8\.0; use expert_precision='model'"):
        check_fp8_device(torch.device("cuda", 0))
    with pytest.raises(ValueError, match="multiple of 32 columns"):
        fp8_block_k(16)
    assert fp8_block_k(128) == 128 and fp8_block_k(192) == 64 and fp8_block_k() == 128
    config = moetrt.from_pretrained("tiny").config
    with pytest.raises(ValueError, match="multiple of 32 columns"):
        fp8_experts(MoETransformer.from_config(config), block=(16, 16))
    with pytest.raises(MoetrtError, match="without biases"):
        fp8_experts(MoETransformer.from_config(dataclasses.replace(config, expert_bias=True)))


def test_session_option_runs_fp8_experts_end_to_end(monkeypatch, tmp_path):
    # the device check passes as on an H200; the experts then run their torch face on the CPU
    monkeypatch.setattr(moetrt.fp8, "check_fp8_device", lambda device: None)
    prompt = [[5, 6, 7, 8, 9, 10, 11, 12]]
    reference = Session("tiny").generate(prompt, max_new_tokens=8)
    session = Session("tiny", expert_precision="fp8", fp8_weight_scales="channel", fp8_activation_scales="block")
    assert session.backend.fp8_layers == {"from_checkpoint": 0, "quantized": 4}
    experts = [m for m in session.backend.model.modules() if isinstance(m, FP8Experts)]
    assert len(experts) == 4 and experts[0].gate_up_block == (1, 128) and experts[0].activation_scales == "block"
    result = session.generate(prompt, max_new_tokens=8)
    assert len(result.tokens[0]) == 8
    assert result.tokens[0][0] == reference.tokens[0][0]  # the trained model's first greedy token survives e4m3
    # an FP8 checkpoint folder: its expert bytes go in as stored
    save_fp8_checkpoint(hf_tiny_model("mixtral", intermediate_size=64), tmp_path, (32, 32))
    session = Session(str(tmp_path), expert_precision="fp8")
    assert session.backend.fp8_layers == {"from_checkpoint": 3, "quantized": 0}
