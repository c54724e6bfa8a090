"""The kernel package without triton: optional import, the block-size table, registration guard."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moetrt.ops.kernels.configs import (
    SPARSE_MOE_CONFIGS,
    GemmConfig,
    SparseMoEConfig,
    sparse_moe_config,
    topk_routing_blocks,
)


def test_import_moetrt_and_registration_do_not_import_triton():
    script = (
        "import sys, moetrt, moetrt.model, moetrt.ops.kernels as k, moetrt.ops.kernels.configs\n"
        "k.maybe_register_cuda_kernels()\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "print(k.triton_mode())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "None"


def test_registration_is_a_no_op_without_triton(monkeypatch):
    import moetrt.ops.kernels as kernels

    monkeypatch.setattr(kernels, "_registered", False)
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    assert kernels.maybe_register_cuda_kernels() is False


def test_table_buckets_grow_with_rows_per_expert():
    bounds = [bound for bound, _ in SPARSE_MOE_CONFIGS]
    assert bounds[-1] is None and bounds[:-1] == sorted(bounds[:-1])
    block_ms = [config.block_m for _, config in SPARSE_MOE_CONFIGS]
    assert block_ms == sorted(block_ms)
    # Mixtral (E=8, K=2): decode steps get the 16-row tile, long prefills the 128-row one
    assert sparse_moe_config(1, 8, 2).block_m == 16
    assert sparse_moe_config(64, 8, 2).block_m == 16
    assert sparse_moe_config(512, 8, 2).block_m == 128
    assert sparse_moe_config(4096, 8, 2).block_m == 128
    # 128 experts, top-8 (Qwen3-MoE): 512 tokens are only 32 rows per expert
    assert sparse_moe_config(512, 128, 8).block_m == 32


@pytest.mark.parametrize("experts", [1, 8, 60, 128, 256])
@pytest.mark.parametrize("tokens", [None, 1, 7, 4096])
def test_routing_blocks_fit_registers(tokens, experts):
    block_t, block_e, num_warps = topk_routing_blocks(tokens, experts)
    assert block_e >= experts and block_e & (block_e - 1) == 0
    assert block_t & (block_t - 1) == 0 and block_t * block_e <= max(2048, block_e)
    assert block_t * block_e <= num_warps * 32 * 16  # <= 16 scores a thread
    if tokens == 1:
        assert block_t == 1


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: GemmConfig(24, 64), "block_n"),
        (lambda: GemmConfig(64, 8), "block_k"),
        (lambda: GemmConfig(64, 64, num_warps=3), "num_warps"),
        (lambda: GemmConfig(64, 64, num_stages=0), "num_stages"),
        (lambda: GemmConfig(64, 64, group_m=-1), "group_m"),
        (lambda: SparseMoEConfig(8, GemmConfig(64, 64), GemmConfig(64, 64)), "block_m"),
    ],
)
def test_config_validation_names_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()
