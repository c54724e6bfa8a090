"""The Triton kernels compiled, on a CUDA GPU, at real sizes (marker ``gpu``).

Same checks as the interpreter tests, at Mixtral-8x7B's expert sizes (D 4096, F 14336, E 8,
top-2) and at Qwen3-MoE-like routing (E 128, top-8), against a float64 reference computed on
the GPU from the same inputs; plus the dispatch of ``torch.ops.moetrt.*`` after
``maybe_register_cuda_kernels()``, CUDA-graph capture, and run-to-run determinism.

The compiled mode is fixed when triton is imported. When this process already imported triton in
the interpreter (the interpreter tests ran first), the whole file reruns in a fresh process.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from moetrt.ops import sparse_moe_eager, topk_routing_reference
from moetrt.ops.kernels import triton_mode

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)", allow_module_level=True)
if importlib.util.find_spec("triton") is None:
    pytest.skip(reason="triton is not installed (pip install moetrt[gpu])", allow_module_level=True)
IN_PROCESS = triton_mode() != "interpret"
in_process = pytest.mark.skipif(
    not IN_PROCESS, reason="triton is in interpreter mode here: test_rerun_compiled runs this file"
)

if IN_PROCESS:
    from moetrt.ops.kernels import maybe_register_cuda_kernels, router_logits
    from moetrt.ops.kernels.router_logits_triton import router_logits_triton
    from moetrt.ops.kernels.sparse_moe_triton import sparse_moe_triton
    from moetrt.ops.kernels.topk_routing_triton import topk_routing_triton

CUDA = torch.device("cuda")
# (tokens T, experts E, k, scoring, normalize)
ROUTING_CASES = [
    (1, 8, 2, "softmax", True),
    (4096, 8, 2, "softmax", True),
    (4093, 64, 6, "softmax", False),
    (4096, 256, 8, "sigmoid", True),
]
# (tokens T, model dim D, experts E): Mixtral decode and prefill, OLMoE-like, DeepSeek-V3-like
ROUTER_CASES = [(1, 4096, 8), (4096, 4096, 8), (7, 2048, 64), (4093, 2048, 64), (3, 7168, 256), (1024, 7168, 256)]
# (tokens T, model dim D, expert dim F, experts E, k, dtype)
MOE_CASES = [
    (1, 4096, 14336, 8, 2, torch.bfloat16),  # Mixtral decode
    (7, 4096, 14336, 8, 2, torch.bfloat16),
    (64, 4096, 14336, 8, 2, torch.bfloat16),
    (513, 4096, 14336, 8, 2, torch.bfloat16),  # Mixtral prefill
    (33, 4096, 14336, 4, 2, torch.float16),  # 4 of Mixtral's experts
    (257, 2048, 768, 128, 8, torch.bfloat16),  # Qwen3-MoE-30B-A3B-like
    (100, 1024, 2048, 8, 2, torch.float32),
]
# gpt-oss-20b's experts (D = F = 2880, E 32, top-4) at decode and prefill, clamped SwiGLU, with
# (gate_up bias, down bias) on or off; (tokens T, dtype, biases)
GPT_OSS_CASES = [
    (1, torch.bfloat16, (True, True)),
    (7, torch.bfloat16, (False, True)),
    (2049, torch.bfloat16, (True, True)),
    (64, torch.float16, (True, False)),
    (100, torch.float32, (True, True)),
]
GPT_OSS_SHAPE = dict(dim=2880, ffn=2880, experts=32, k=4)
GPT_OSS_ATTRS = dict(activation="clamped_swiglu", alpha=1.702, limit=7.0)
# NOTE: relative Frobenius error against float64 on the same inputs. The kernels round three
# times to the model dtype (h, each slot's output, y); bf16 keeps 8 significant bits (unit
# roundoff 2^-8 = 3.9e-3, about 1.6e-3 rms per rounding of random values), so about 3e-3 is
# expected and 1e-2 leaves 3x margin; fp32 accumulation over 4096 or 14336 terms adds ~1e-5.
# fp16 has 11 bits (2^-11); fp32 inputs multiply exactly (input_precision="ieee").
RTOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def _rel_fro(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.double(), ref.double()
    return float(torch.linalg.norm(ours - ref) / torch.linalg.norm(ref).clamp(min=1e-300))


def _moe_inputs(tokens, dim, ffn, experts, k, dtype, seed=0):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    x = torch.randn(tokens, dim, device=CUDA, generator=g).to(dtype)
    w_gate_up = (torch.randn(experts, 2 * ffn, dim, device=CUDA, generator=g) * dim**-0.5).to(dtype)
    w_down = (torch.randn(experts, dim, ffn, device=CUDA, generator=g) * ffn**-0.5).to(dtype)
    logits = torch.randn(tokens, experts, device=CUDA, generator=g)
    weights, indices = torch.ops.moetrt.TopKRouting(logits, k, "softmax", True, 1.0)
    return x, weights, indices, w_gate_up, w_down


def _reference_fp64(x, weights, indices, w_gate_up, w_down, b_gate_up=None, b_down=None, activation="silu",
                    alpha=1.702, limit=7.0, weight_input=0) -> torch.Tensor:
    ffn = w_down.shape[2]
    y = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    flat = indices.reshape(-1).long()
    for e in flat.unique().tolist():
        pairs = (flat == e).nonzero().squeeze(1)  # [n]
        tokens = pairs // indices.shape[1]
        rows = x[tokens].double()  # [n, D]
        if weight_input:  # Llama 4: the routing weight scales the expert's input
            rows = rows * weights.reshape(-1)[pairs, None].double()
        gate_up = rows @ w_gate_up[e].double().t()  # [n, 2F]
        if b_gate_up is not None:
            gate_up = gate_up + b_gate_up[e].double()
        gate, up = gate_up[:, :ffn], gate_up[:, ffn:]
        if activation == "silu":
            hidden = torch.nn.functional.silu(gate) * up
        else:
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
            hidden = (up + 1) * gate * torch.sigmoid(alpha * gate)
        out = hidden @ w_down[e].double().t()
        if b_down is not None:
            out = out + b_down[e].double()
        y.index_add_(0, tokens, out if weight_input else out * weights.reshape(-1)[pairs, None].double())
    return y


@in_process
@pytest.mark.parametrize("tokens,experts,k,scoring,normalize", ROUTING_CASES)
def test_topk_routing_matches_reference(tokens, experts, k, scoring, normalize):
    logits = torch.randn(tokens, experts, device=CUDA) * 2
    weights, indices = topk_routing_triton(logits, k, scoring, normalize, 1.0)
    ref_w, ref_i = topk_routing_reference(logits.cpu().numpy(), k, scoring, normalize, 1.0)
    ours_i, ours_w = indices.cpu().numpy(), weights.cpu().numpy()
    same = (ours_i == ref_i).all(axis=1)
    # a differing row must be a near-tie: the reference's k-th and (k+1)-th scores within 1e-6
    # (tl.exp and the division round differently from float64 numpy)
    if not same.all():
        scores = torch.softmax(logits.double(), -1) if scoring == "softmax" else torch.sigmoid(logits.double())
        top = scores.sort(dim=-1, descending=True).values.cpu().numpy()
        gaps = top[:, k - 1] - (top[:, k] if k < experts else -np.inf)
        bad = np.nonzero(~same & (gaps > 1e-6))[0]
        assert bad.size == 0, f"rows {bad[:10]} differ without a near-tie"
    # NOTE: weights in float32 via the GPU's approximate exp/divide, vs float64: a few ulps
    np.testing.assert_allclose(ours_w[same], ref_w[same], rtol=1e-5, atol=1e-7)


@in_process
@pytest.mark.parametrize("tokens,dim,experts", ROUTER_CASES)
def test_router_logits_match_float64(tokens, dim, experts, record_max):
    g = torch.Generator(device=CUDA).manual_seed(tokens + experts)
    x = torch.randn(tokens, dim, device=CUDA, generator=g).to(torch.bfloat16)
    weight = (torch.randn(experts, dim, device=CUDA, generator=g) * dim**-0.5).to(torch.bfloat16)
    ref = x.double() @ weight.double().t()
    ours = router_logits_triton(x, weight)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        linear = torch.nn.functional.linear(x.float(), weight.float())  # the model's PyTorch form
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    err, linear_err = (float((v.double() - ref).abs().max()) for v in (ours, linear))
    record_max("router logits kernel (GPU): max abs error vs float64", f"T={tokens} D={dim} E={experts}", err)
    # NOTE: fp32 sums of D exact products of unit size: a few ulps of sqrt(D) ~ 64, i.e. ~1e-5;
    # never much worse than cuBLAS's fp32 sum of the same products
    assert ours.dtype == torch.float32 and ours.shape == (tokens, experts)
    assert err <= max(4 * linear_err, 1e-5), (err, linear_err)


@in_process
@pytest.mark.parametrize("tokens,dim,ffn,experts,k,dtype", MOE_CASES)
def test_sparse_moe_matches_float64(tokens, dim, ffn, experts, k, dtype, record_max):
    x, weights, indices, w_gate_up, w_down = _moe_inputs(tokens, dim, ffn, experts, k, dtype)
    y = sparse_moe_triton(x, weights, indices, w_gate_up, w_down)
    ref = _reference_fp64(x, weights, indices, w_gate_up, w_down)
    err = _rel_fro(y, ref)
    eager_err = _rel_fro(sparse_moe_eager(x, weights, indices, w_gate_up, w_down), ref)
    key = f"T={tokens} D={dim} F={ffn} E={experts} k={k} {dtype}"
    record_max("Triton kernels (GPU): relative Frobenius error vs float64", key, err)
    record_max("torch op eager (GPU): relative Frobenius error vs float64", key, eager_err)
    assert err <= RTOL[dtype], err
    # one rounding of the fused SwiGLU instead of three in the eager op: never much worse
    assert err <= 2 * eager_err + 1e-6, (err, eager_err)


@in_process
@pytest.mark.parametrize("tokens,dtype,biases", GPT_OSS_CASES)
def test_clamped_swiglu_with_biases_matches_float64(tokens, dtype, biases, record_max):
    x, weights, indices, w_gate_up, w_down = _moe_inputs(tokens, **GPT_OSS_SHAPE, dtype=dtype, seed=tokens)
    g = torch.Generator(device=CUDA).manual_seed(tokens + 1)
    experts, dim, ffn = GPT_OSS_SHAPE["experts"], GPT_OSS_SHAPE["dim"], GPT_OSS_SHAPE["ffn"]
    b_gate_up = (torch.randn(experts, 2 * ffn, device=CUDA, generator=g) * 2).to(dtype) if biases[0] else None
    b_down = torch.randn(experts, dim, device=CUDA, generator=g).to(dtype) if biases[1] else None
    x = x * 4  # gate and up reach gpt-oss's limit of 7 (unit-variance projections otherwise rarely do)
    y = sparse_moe_triton(x, weights, indices, w_gate_up, w_down, b_gate_up, b_down, **GPT_OSS_ATTRS)
    ref = _reference_fp64(x, weights, indices, w_gate_up, w_down, b_gate_up, b_down, **GPT_OSS_ATTRS)
    err = _rel_fro(y, ref)
    eager = sparse_moe_eager(x, weights, indices, w_gate_up, w_down, b_gate_up, b_down, **GPT_OSS_ATTRS)
    eager_err = _rel_fro(eager, ref)
    key = f"gpt-oss T={tokens} {dtype} biases={biases}"
    record_max("Triton kernels (GPU): relative Frobenius error vs float64", key, err)
    assert err <= RTOL[dtype], err
    assert err <= 2 * eager_err + 1e-6, (err, eager_err)
    assert maybe_register_cuda_kernels()  # the op on CUDA runs these kernels, the new arguments passed through
    op = torch.ops.moetrt.SparseMoE(x, weights, indices, w_gate_up, w_down, b_gate_up, b_down, *GPT_OSS_ATTRS.values())
    assert torch.equal(y, op)


@in_process
def test_router_with_a_bias_matches_float64():
    g = torch.Generator(device=CUDA).manual_seed(3)
    for tokens in (1, 4096):  # the broadcast and the dot paths
        x = torch.randn(tokens, 2880, device=CUDA, generator=g).to(torch.bfloat16)
        weight = (torch.randn(32, 2880, device=CUDA, generator=g) * 2880**-0.5).to(torch.bfloat16)
        bias = torch.randn(32, device=CUDA, generator=g).to(torch.bfloat16)
        ref = x.double() @ weight.double().t() + bias.double()
        ours = router_logits_triton(x, weight, bias)
        # NOTE: fp32 sums of 2880 exact products of unit size: a few ulps of sqrt(D) ~ 54
        assert float((ours.double() - ref).abs().max()) <= 2e-5
        assert maybe_register_cuda_kernels() and torch.equal(router_logits(x, weight, bias), ours)


@in_process
def test_align_methods_give_bitwise_equal_outputs():
    x, weights, indices, w_gate_up, w_down = _moe_inputs(257, 2048, 768, 128, 8, torch.bfloat16, seed=1)
    a = sparse_moe_triton(x, weights, indices, w_gate_up, w_down, align="triton")
    b = sparse_moe_triton(x, weights, indices, w_gate_up, w_down, align="torch")
    assert torch.equal(a, b)
    assert torch.equal(a, sparse_moe_triton(x, weights, indices, w_gate_up, w_down, align="triton"))


@in_process
def test_registered_ops_dispatch_to_the_kernels():
    assert maybe_register_cuda_kernels()
    x, weights, indices, w_gate_up, w_down = _moe_inputs(9, 1024, 512, 8, 2, torch.bfloat16, seed=2)
    logits = torch.randn(9, 8, device=CUDA)
    op_w, op_i = torch.ops.moetrt.TopKRouting(logits, 2, "softmax", True, 1.0)
    ker_w, ker_i = topk_routing_triton(logits, 2, "softmax", True, 1.0)
    assert torch.equal(op_i, ker_i) and torch.equal(op_w, ker_w)
    y_op = torch.ops.moetrt.SparseMoE(x, weights, indices, w_gate_up, w_down, activation="silu")
    assert torch.equal(y_op, sparse_moe_triton(x, weights, indices, w_gate_up, w_down))
    gate = torch.randn(8, 1024, device=CUDA, dtype=torch.bfloat16)
    assert torch.equal(router_logits(x, gate), router_logits_triton(x, gate))  # what the model's router calls


@in_process
@pytest.mark.parametrize("tokens", [1, 8])
def test_decode_step_captures_in_a_cuda_graph(tokens):
    dim, ffn, experts, k = 1024, 2048, 8, 2
    x, _, _, w_gate_up, w_down = _moe_inputs(tokens, dim, ffn, experts, k, torch.bfloat16, seed=3)
    router = torch.randn(experts, dim, device=CUDA) * dim**-0.5
    assert maybe_register_cuda_kernels()

    def step():
        logits = router_logits(x, router)  # [T, E], the router kernel once registered
        weights, indices = topk_routing_triton(logits, k, "softmax", True, 1.0)
        return sparse_moe_triton(x, weights, indices, w_gate_up, w_down)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = step()
    for seed in range(3):
        x.copy_(torch.randn(tokens, dim, device=CUDA, generator=torch.Generator(device=CUDA).manual_seed(seed)))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y_static, step()), seed


def _decode_model(dtype):
    import moetrt

    config = moetrt.MoEConfig(
        vocab_size=1000, hidden_size=512, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
        num_experts=8, num_experts_per_tok=2, intermediate_size=1024, max_position_embeddings=2048,
    )  # fmt: skip
    return moetrt.MoETransformer.from_config(config, std=0.05).to(dtype)


@in_process
def test_torch_backend_decode_graphs_match_eager_steps(monkeypatch):
    """The runtime's CUDA-graph decode gives the eager static-cache tokens and logits, across cache growth."""
    import moetrt.runtime.backend_torch as backend_module
    from moetrt.runtime.backend_torch import TorchBackend
    from moetrt.runtime.generate import Generation, SamplingOptions

    monkeypatch.setattr(sys.modules[backend_module.__name__], "CAPACITY_STEP", 16)  # grows (and re-captures) twice
    model = _decode_model(torch.bfloat16)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 1000, size=n).tolist() for n in (13, 5)]
    options = SamplingOptions(max_new_tokens=40)
    graphs = TorchBackend(model, "cuda", cuda_graphs=True)
    eager = TorchBackend(model, "cuda", static_cache=True, cuda_graphs=False)
    got = Generation(graphs, prompts, options).run()
    ref = Generation(eager, prompts, options).run()
    assert got.tokens == ref.tokens
    assert graphs._cache.capacity >= 13 + 40 - 1 and graphs._graphs  # grew, and decode ran from a graph
    again = Generation(graphs, prompts, options).run()  # reuses cache and graph
    assert again.tokens == ref.tokens


@in_process
def test_torch_backend_cuda_fp32_matches_the_cpu_model():
    """fp32 on CUDA (Triton kernels with ieee dots, static cache, graphs) against the CPU reference model."""
    from moetrt.runtime.backend_torch import TorchBackend

    model = _decode_model(torch.float32)
    cuda, cpu = TorchBackend(model, "cuda"), TorchBackend(_decode_model(torch.float32), "cpu")
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 1000, size=(2, 9))
    mask = np.ones((2, 9), dtype=np.int64)
    mask[1, :4] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": np.where(mask == 1, mask.cumsum(1) - 1, 1)}
    outs = [b.forward({**feeds, **b.empty_past(2)}) for b in (cuda, cpu)]
    for step in range(4):
        real = feeds["attention_mask"][:, -feeds["input_ids"].shape[1] :].astype(bool)  # [B, S]
        np.testing.assert_allclose(outs[0]["logits"][real], outs[1]["logits"][real], rtol=0, atol=2e-4)
        next_ids = outs[1]["logits"][:, -1].argmax(-1)[:, None]
        mask = np.concatenate([feeds["attention_mask"], np.ones((2, 1), dtype=np.int64)], 1)
        feeds = {"input_ids": next_ids, "attention_mask": mask, "position_ids": mask.sum(1, keepdims=True) - 1}
        outs = [
            b.forward({**feeds, **{k.replace("present", "past_key_values"): v for k, v in o.items() if "present" in k}})
            for b, o in zip((cuda, cpu), outs)
        ]
    assert cuda._graphs  # the decode steps ran from a graph


@pytest.mark.skipif(IN_PROCESS, reason="triton is compiled in this process: the tests above ran here")
def test_rerun_compiled():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", __file__],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


# Llama 4 Scout's routing on smaller experts (E 16, top-1, sigmoid scores scaling the experts' input);
# (tokens T, dtype): decode and prefill rows of the config table
LLAMA4_CASES = [(1, torch.bfloat16), (300, torch.bfloat16), (64, torch.float16), (100, torch.float32)]
LLAMA4_SHAPE = dict(dim=1024, ffn=2048, experts=16, k=1)


@in_process
@pytest.mark.parametrize("tokens,dtype", LLAMA4_CASES)
def test_weight_input_matches_float64(tokens, dtype, record_max):
    x, _, _, w_gate_up, w_down = _moe_inputs(tokens, **LLAMA4_SHAPE, dtype=dtype, seed=tokens + 7)
    logits = torch.randn(tokens, LLAMA4_SHAPE["experts"], device=CUDA, generator=torch.Generator(device=CUDA).manual_seed(3))
    weights, indices = torch.ops.moetrt.TopKRouting(logits, 1, "sigmoid", False, 1.0)
    y = sparse_moe_triton(x, weights, indices, w_gate_up, w_down, weight_input=1)
    ref = _reference_fp64(x, weights, indices, w_gate_up, w_down, weight_input=1)
    err = _rel_fro(y, ref)
    eager_err = _rel_fro(sparse_moe_eager(x, weights, indices, w_gate_up, w_down, weight_input=1), ref)
    record_max("Triton kernels (GPU): relative Frobenius error vs float64", f"llama4 T={tokens} {dtype}", err)
    assert err <= RTOL[dtype], err
    assert err <= 2 * eager_err + 1e-6, (err, eager_err)
    assert maybe_register_cuda_kernels()  # the op on CUDA runs these kernels, weight_input passed through
    assert torch.equal(y, torch.ops.moetrt.SparseMoE(x, weights, indices, w_gate_up, w_down, weight_input=1))
