"""Offline compilation of the FP8-expert kernels for sm_90 on a machine without a GPU.

What a Hopper run would execute, read from the PTX Triton 3.6 emits: the prefill tiles (64 rows
and more) multiply e4m3 tiles on the FP8 tensor cores (``wgmma.mma_async ... .e4m3.e4m3``); the
16-row decode tiles go through Triton's ``mma.sync`` path, which on sm_90 widens the e4m3 tiles
to fp16 in registers (``cvt.rn.f16x2.e4m3x2``) before an fp16 MMA: the weights still cross memory
as one byte each, which is what a bandwidth-bound decode step pays for. The quantizers round with
the hardware's saturating ``cvt.rn.satfinite.e4m3x2.f32``. No kernel spills to local memory
(cuobjdump's LOCAL, when the cubin is built) and each fits sm_90's shared memory.

The compile runs in a child process without ``TRITON_INTERPRET``.
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

# DeepSeek-V3's routed experts (D 7168, F 2048, E 256, top-8) in its checkpoints' 128 x 128 blocks: the decode
# and the prefill rows of the table (T*k/E = 128 rows per expert at T = 4096); Mixtral-8x7B's sizes with
# per-channel weight scales and DeepSeek's per-128-column activation scales
BUILDS = {
    "deepseek_decode": {"dtype": "bf16", "hidden_size": 7168, "ffn": 2048, "num_experts": 256, "k": 8, "num_tokens": 1},
    "deepseek_prefill": {"dtype": "bf16", "hidden_size": 7168, "ffn": 2048, "num_experts": 256, "k": 8,
                         "num_tokens": 4096},
    "mixtral_prefill_channel": {"dtype": "bf16", "hidden_size": 4096, "ffn": 14336, "num_experts": 8, "k": 2,
                                "num_tokens": 4096, "weight_scales": "channel", "activation_scales": "block"},
}  # fmt: skip
KERNELS = ["fp8_quantize_x", "moe_align", "moe_gate_up_fp8", "fp8_quantize_h", "moe_down_fp8", "moe_combine"]
MAX_SHARED = 227 * 1024
WGMMA_FP8 = re.compile(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.f32\.e4m3\.e4m3")

_SCRIPT = """
import json, sys
from moetrt.ops.kernels.compile import compile_for_sm90
out = {}
for key, attrs in json.loads(sys.argv[1]).items():
    result = compile_for_sm90("sparse_moe_fp8", **attrs)
    for kernel in result["kernels"]:
        kernel["has_cubin"] = bool(kernel.pop("cubin"))
    out[key] = result
json.dump(out, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = tmp_path_factory.mktemp("sm90_fp8") / "compiled.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(BUILDS), str(path)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(path.read_text())


def _kernels(compiled, build):
    return {k["name"]: k for k in compiled[build]["kernels"]}


@pytest.mark.parametrize("build", list(BUILDS))
def test_fp8_kernels_compile_for_sm90(compiled, build):
    kernels = _kernels(compiled, build)
    assert list(kernels) == KERNELS
    for name, kernel in kernels.items():
        assert re.search(r"^\.target sm_90a?\b", kernel["ptx"], re.M), name
        assert kernel["shared"] <= MAX_SHARED, (name, kernel["shared"])
        if kernel["has_cubin"] and kernel["local_bytes"] is not None:  # ptxas and cuobjdump ran
            assert kernel["local_bytes"] == 0, f"{name} spills {kernel['local_bytes']} bytes a thread"
            assert kernel["registers"] <= 255, (name, kernel["registers"])
    for name in ("fp8_quantize_x", "fp8_quantize_h"):
        assert "cvt.rn.satfinite.e4m3x2.f32" in kernels[name]["ptx"], name


@pytest.mark.parametrize("build", ["deepseek_prefill", "mixtral_prefill_channel"])
def test_prefill_tiles_run_on_fp8_tensor_cores(compiled, build):
    for name in ("moe_gate_up_fp8", "moe_down_fp8"):
        kernel = _kernels(compiled, build)[name]
        assert kernel["constants"]["BLOCK_M"] >= 64
        assert WGMMA_FP8.search(kernel["ptx"]), f"{build} {name}: no FP8 wgmma"
        assert "f16.f16" not in " ".join(re.findall(r"(?:wgmma|mma)\S*", kernel["ptx"])), "an fp16 MMA beside it"


def test_decode_tiles_read_fp8_bytes(compiled):
    for name in ("moe_gate_up_fp8", "moe_down_fp8"):
        kernel = _kernels(compiled, "deepseek_decode")[name]
        assert kernel["constants"]["BLOCK_M"] == 16
        # Triton 3.6 on sm_90: 16-row tiles take mma.sync; e4m3 operands are widened in registers
        assert "cvt.rn.f16x2.e4m3x2" in kernel["ptx"] and "mma.sync.aligned" in kernel["ptx"], name
        assert "ld.global" in kernel["ptx"]


def test_sparse_moe_fp8_compiles_from_the_command_line(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "moetrt.ops.kernels.compile", "sparse_moe_fp8", "--hidden", "256", "--ffn", "256",
         "--experts", "4", "--k", "2", "--tokens", "512", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [k["name"] for k in manifest["kernels"]] == KERNELS
    assert WGMMA_FP8.search((tmp_path / "moe_gate_up_fp8.ptx").read_text())
