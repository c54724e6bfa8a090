"""Offline compilation of every kernel for sm_90 on a machine without a GPU.

The compile runs in a child process without ``TRITON_INTERPRET`` (an interpreter-mode triton,
as the interpreter tests set up, cannot compile), exactly as a plugin build would call it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip(reason="triton is not installed (pip install moetrt[gpu])", allow_module_level=True)

# (op, attributes): Mixtral-8x7B's experts at a decode and a prefill row of the config table,
# fp16 at small sizes, and routers from Mixtral's to a 256-expert sigmoid router
BUILDS = {
    "router_e8": ("topk_routing", {"num_experts": 8, "k": 2, "scoring": "softmax", "normalize": True}),
    "router_e256": ("topk_routing", {"num_experts": 256, "k": 8, "scoring": "sigmoid", "normalize": True}),
    "mixtral_decode": (
        "sparse_moe",
        {"dtype": "bf16", "hidden_size": 4096, "ffn": 14336, "num_experts": 8, "k": 2, "num_tokens": 1},
    ),
    "mixtral_prefill": (
        "sparse_moe",
        {"dtype": "bf16", "hidden_size": 4096, "ffn": 14336, "num_experts": 8, "k": 2, "num_tokens": 4096},
    ),
    "mixtral_prefill_grouped": (
        "sparse_moe",
        {
            "dtype": "bf16", "hidden_size": 4096, "ffn": 14336, "num_experts": 8, "k": 2,
            "config": {"block_m": 128, "gate_up": [128, 64, 8, 3, 8], "down": [256, 64, 8, 3, 8]},
        },
    ),  # fmt: skip
    "router_logits_e8": ("router_logits", {"dtype": "bf16", "hidden_size": 4096, "num_experts": 8}),
    "router_logits_e256": ("router_logits", {"dtype": "bf16", "hidden_size": 7168, "num_experts": 256}),
    "small_fp16": (
        "sparse_moe",
        {"dtype": "fp16", "hidden_size": 1000, "ffn": 360, "num_experts": 60, "k": 4, "num_tokens": 64},
    ),
    # gpt-oss-20b's experts (D = F = 2880, E 32, top-4): clamped SwiGLU with both biases, decode and prefill rows;
    # one bias at a time on fp16; its router's bias
    "gpt_oss_decode": (
        "sparse_moe",
        {"dtype": "bf16", "hidden_size": 2880, "ffn": 2880, "num_experts": 32, "k": 4, "num_tokens": 1,
         "activation": "clamped_swiglu", "has_b_gate_up": True, "has_b_down": True},
    ),
    "gpt_oss_prefill": (
        "sparse_moe",
        {"dtype": "bf16", "hidden_size": 2880, "ffn": 2880, "num_experts": 32, "k": 4, "num_tokens": 4096,
         "activation": "clamped_swiglu", "has_b_gate_up": True, "has_b_down": True},
    ),
    "gate_up_bias_fp16": (
        "sparse_moe",
        {"dtype": "fp16", "hidden_size": 1000, "ffn": 360, "num_experts": 60, "k": 4, "num_tokens": 64,
         "activation": "clamped_swiglu", "has_b_gate_up": True},
    ),
    "down_bias_fp16": (
        "sparse_moe",
        {"dtype": "fp16", "hidden_size": 1000, "ffn": 360, "num_experts": 60, "k": 4, "num_tokens": 64,
         "has_b_down": True},
    ),
    "router_logits_gpt_oss": ("router_logits", {"dtype": "bf16", "hidden_size": 2880, "num_experts": 32,
                                                "has_bias": True}),
}  # fmt: skip
KERNELS = {
    "topk_routing": ["topk_routing"],
    "sparse_moe": ["moe_align", "moe_gate_up", "moe_down", "moe_combine"],
    "router_logits": ["router_logits"],
}
ENTRY = {"topk_routing": "topk_routing_kernel", "moe_align": "moe_align_kernel", "moe_gate_up": "moe_gate_up_kernel",
         "moe_down": "moe_down_kernel", "moe_combine": "moe_combine_kernel",
         "router_logits": "router_logits_kernel"}  # fmt: skip
MAX_SHARED = 227 * 1024  # bytes of shared memory one sm_90 block may use
CASES = [(build, name) for build, (op, _) in BUILDS.items() for name in KERNELS[op]]

_SCRIPT = """
import json, sys
from moetrt.ops.kernels.compile import compile_for_sm90
from moetrt.ops.kernels.configs import GemmConfig, SparseMoEConfig
builds = json.loads(sys.argv[1])
out = {}
for key, (op, attrs) in builds.items():
    if "config" in attrs:
        c = attrs["config"]
        attrs["config"] = SparseMoEConfig(c["block_m"], GemmConfig(*c["gate_up"]), GemmConfig(*c["down"]))
    result = compile_for_sm90(op, **attrs)
    for kernel in result["kernels"]:
        cubin = kernel.pop("cubin")
        kernel["cubin_head"] = cubin[:4].hex() if cubin else None
    out[key] = result
json.dump(out, open(sys.argv[2], "w"))
"""


def _child_env() -> dict:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    return env


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = tmp_path_factory.mktemp("sm90") / "compiled.json"
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(BUILDS), str(path)],
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(path.read_text())


def _kernel(compiled, build, name):
    return next(k for k in compiled[build]["kernels"] if k["name"] == name)


def _grid(formula: str, tokens: int) -> int:
    return eval(formula, {"__builtins__": {}}, {"cdiv": lambda a, b: -(-a // b), "min": min, "T": tokens})


@pytest.mark.parametrize("build,name", CASES)
def test_kernel_compiles_to_sm90_ptx(compiled, build, name):
    kernel = _kernel(compiled, build, name)
    assert compiled[build]["target"] == kernel["target"] == "sm_90"
    assert kernel["entry"] == ENTRY[name]
    ptx = kernel["ptx"]
    assert re.search(r"^\.target sm_90a?\b", ptx, re.M), ptx[:400]
    entry = re.search(rf"\.visible \.entry {kernel['entry']}\((.*?)\)", ptx, re.S)
    assert entry, f"no entry {kernel['entry']} in the PTX"
    # the launch parameters the manifest lists (own ones + the two scratch pointers) are the PTX's
    assert entry.group(1).count(".param") == len(kernel["params"])
    assert [p[0] for p in kernel["params"][-2:]] == ["global_scratch", "profile_scratch"]
    assert kernel["global_scratch_size"] == 0 and kernel["profile_scratch_size"] == 0
    assert f".reqntid {kernel['num_warps'] * 32}" in ptx
    assert 0 <= kernel["shared"] <= MAX_SHARED
    if kernel["cubin_head"] is not None:  # ptxas ships with triton wheels
        assert kernel["cubin_head"] == "7f454c46"  # ELF
        assert kernel["registers"] is None or 0 < kernel["registers"] <= 255
        assert kernel["local_bytes"] in (None, 0), "registers spill to local memory"
    for tokens in (1, 7, 4096):
        grid = [_grid(g, tokens) for g in kernel["grid"]]
        assert all(g >= 1 for g in grid) and grid[1] < 65536 and grid[2] < 65536, grid


def test_sparse_moe_workspace_and_tensor_core_paths(compiled):
    workspace = compiled["mixtral_decode"]["workspace"]
    assert set(workspace) == {"sorted_ids", "expert_ids", "num_padded", "h", "slots"}
    assert _grid(workspace["h"]["elements"], 3) == 3 * 2 * 14336
    # decode tiles (BLOCK_M 16) use mma.sync; prefill tiles (BLOCK_M 128, 8 warps) use Hopper's wgmma
    decode, prefill = (_kernel(compiled, b, "moe_gate_up")["ptx"] for b in ("mixtral_decode", "mixtral_prefill"))
    assert "mma.sync" in decode
    assert "wgmma" in prefill
    grouped = _kernel(compiled, "mixtral_prefill_grouped", "moe_gate_up")
    assert grouped["constants"]["GROUP_M"] == 8 and "wgmma" in grouped["ptx"]
    assert _kernel(compiled, "mixtral_prefill", "moe_gate_up")["constants"]["GROUP_M"] == 0
    for build in ("mixtral_decode", "mixtral_prefill"):
        gate_up = _kernel(compiled, build, "moe_gate_up")
        assert gate_up["constants"]["D"] == 4096 and gate_up["constants"]["F"] == 14336
        assert "cp.async" in gate_up["ptx"]  # pipelined loads


def _param_names(kernel) -> list[str]:
    return [name for name, _ in kernel["params"]]


def test_bias_and_activation_variants_take_their_parameters(compiled):
    """A bias is a pointer parameter only when present, the clamp's alpha and limit are run-time fp32 scalars of the
    clamped variant only; SwiGLU without biases keeps the parameters it always had."""
    silu_gate_up, silu_down = (_kernel(compiled, "small_fp16", n) for n in ("moe_gate_up", "moe_down"))
    assert _param_names(silu_gate_up)[:3] == ["x_ptr", "w_ptr", "h_ptr"]
    assert not {"b_ptr", "alpha", "limit"} & set(_param_names(silu_gate_up)) and "b_ptr" not in _param_names(silu_down)
    for build in ("gpt_oss_decode", "gpt_oss_prefill"):
        gate_up, down = (_kernel(compiled, build, n) for n in ("moe_gate_up", "moe_down"))
        assert _param_names(gate_up)[:4] == ["x_ptr", "w_ptr", "b_ptr", "h_ptr"]
        assert dict(map(tuple, gate_up["params"]))["alpha"] == dict(map(tuple, gate_up["params"]))["limit"] == "fp32"
        assert gate_up["constants"]["ACTIVATION"] == "clamped_swiglu" and _param_names(down)[:3] == ["h_ptr", "w_ptr",
                                                                                                     "b_ptr"]
        assert "ex2.approx" in gate_up["ptx"] and "min.f32" in gate_up["ptx"]  # sigmoid's exp and the clamp
    assert "b_ptr" in _param_names(_kernel(compiled, "gate_up_bias_fp16", "moe_gate_up"))
    assert "b_ptr" not in _param_names(_kernel(compiled, "gate_up_bias_fp16", "moe_down"))
    assert "b_ptr" not in _param_names(_kernel(compiled, "down_bias_fp16", "moe_gate_up"))
    assert "alpha" not in _param_names(_kernel(compiled, "down_bias_fp16", "moe_gate_up"))
    assert "b_ptr" in _param_names(_kernel(compiled, "down_bias_fp16", "moe_down"))
    # prefill keeps Hopper's wgmma with the bias epilogue
    assert "wgmma" in _kernel(compiled, "gpt_oss_prefill", "moe_gate_up")["ptx"]
    router = _kernel(compiled, "router_logits_gpt_oss", "router_logits")
    assert _param_names(router)[:3] == ["x_ptr", "w_ptr", "b_ptr"]
    assert "b_ptr" not in _param_names(_kernel(compiled, "router_logits_e8", "router_logits"))


def test_router_logits_paths_stay_fp32(compiled):
    # Mixtral's 8 experts take the broadcast path, 256 experts the dot; both multiply in fp32 (no
    # tensor-core MMA, which would round the inputs to TF32) from model-dtype loads
    small, wide = (_kernel(compiled, b, "router_logits") for b in ("router_logits_e8", "router_logits_e256"))
    assert small["constants"]["USE_DOT"] is False and wide["constants"]["USE_DOT"] is True
    for kernel in (small, wide):
        assert "mma" not in kernel["ptx"]
        assert "fma.rn.f32" in kernel["ptx"]
        assert _grid(kernel["grid"][0], 4096) * kernel["constants"]["BLOCK_T"] >= 4096
    assert _grid(wide["grid"][1], 1) * wide["constants"]["BLOCK_E"] >= 256


_SWEEP_SCRIPT = """
import json, sys
from moetrt.ops.kernels.compile import compile_spec, sparse_moe_specs
from moetrt.ops.kernels.configs import SparseMoEConfig, sweep_candidates
out = []
for rows in (0.25, 32, 128, 1024):  # Mixtral at T = 1, 128, 512, 4096: every regime
    for bm, gate_ups, downs in sweep_candidates(rows):
        for role, tiles in (("moe_gate_up", gate_ups), ("moe_down", downs)):
            for tile in tiles:
                gate_up, down = (tile, downs[0]) if role == "moe_gate_up" else (gate_ups[0], tile)
                config = SparseMoEConfig(bm, gate_up, down)
                spec = next(s for s in sparse_moe_specs("bf16", 4096, 14336, 8, 2, config=config) if s.name == role)
                kernel = compile_spec(spec)
                out.append({"rows": rows, "block_m": bm, "kernel": role, "tile": repr(tile), "shared": kernel["shared"],
                            "registers": kernel["registers"], "local_bytes": kernel["local_bytes"]})
json.dump(out, open(sys.argv[1], "w"))
"""


def test_every_sweep_candidate_compiles_within_sm90_limits(tmp_path):
    """The tuner's candidates (configs.sweep_candidates) at Mixtral sizes: each fits one block's shared memory and
    its registers without spilling, so a sweep on a GPU spends no time on tiles that cannot launch or that spill."""
    path = tmp_path / "sweep.json"
    result = subprocess.run([sys.executable, "-c", _SWEEP_SCRIPT, str(path)], env=_child_env(), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    kernels = json.loads(path.read_text())
    assert {k["block_m"] for k in kernels} == {16, 32, 64, 128}
    too_big = [k for k in kernels if k["shared"] > MAX_SHARED]
    spilling = [k for k in kernels if k["local_bytes"] not in (None, 0)]
    assert not too_big, too_big
    assert not spilling, spilling


def test_cli_writes_ptx_cubin_and_manifest(tmp_path):
    command = [sys.executable, "-m", "moetrt.ops.kernels.compile", "topk_routing", "--experts", "8", "--k", "2"]
    command += ["--normalize", "--out", str(tmp_path)]
    result = subprocess.run(command, env=_child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [k["name"] for k in manifest["kernels"]] == ["topk_routing"]
    assert "ptx" not in manifest["kernels"][0]
    assert ".entry topk_routing_kernel" in (tmp_path / "topk_routing.ptx").read_text()
    assert "topk_routing" in result.stdout


def test_compile_refuses_interpreter_mode():
    script = (
        "from moetrt.ops.kernels.compile import compile_for_sm90; compile_for_sm90('topk_routing', num_experts=8, k=2)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "without TRITON_INTERPRET" in result.stderr
