"""Block sizes of the Triton kernels, chosen per problem size from a small table.

No triton import here: the table is plain data, read by the kernels, the offline compiler and
the benchmark alike.

SparseMoE runs two grouped GEMMs whose M dimension is the number of (token, slot) rows an
expert receives. What decides the best tile is therefore the average rows per expert,
``T * K / E`` (for Mixtral, ``E = 8, K = 2``: ``T / 4``; a decode step with ``T <= 16`` tokens
gives at most 4 rows per expert), so the table is keyed on that.

Rationale for the entries (H200 / sm_90: 132 SMs, ~4.8 TB/s HBM3e, ~990 dense bf16 TFLOP/s,
so a GEMM is bandwidth-bound below ~200 rows per expert):

* decode, <= 16 rows per expert: the work is streaming expert weights once. ``BLOCK_M = 16`` is
  the smallest MMA tile, so at most 15 padded rows are wasted; narrow N tiles (64 for gate|up,
  whose tile is really 2 x 64 wide, and 32 for down) give ``F / 64 = 224`` and
  ``D / 32 = 128`` programs per routed expert, several per SM, and a long ``BLOCK_K`` with 4
  pipeline stages keeps ~100 KB of weight loads in flight per program.
* 16 to 64 rows: the same, with ``BLOCK_M`` grown to the rows an expert really gets.
* 64 to 256 rows: the GEMMs turn compute-bound; 64 x 128 tiles match one Hopper warpgroup MMA
  and halve the re-reads of ``x`` relative to 64-wide tiles.
* above 256 rows: 128-row tiles with 8 warps for the highest arithmetic intensity. gate|up keeps
  ``BLOCK_N = 64`` because it holds two accumulators (gate and up), so its tile is 128 x 128 of
  fp32 (128 registers a thread at 8 warps), and 3 stages fit 96 KB of shared memory.

The first two rows are those starting values, confirmed by a sweep on an H200 (T = 1 and 64 at
Mixtral sizes: no candidate beat them by more than the run-to-run spread). The last two are the
sweep's winners at T = 512 and T = 4096 (128-row tiles with 128/256-wide N tiles and 8 warps:
1% and 7% faster than the derived values). ``benchmarks/bench_kernels_h200.py --tune`` times
the candidates per token count and prints the rows to paste here; the results are recorded in
``benchmarks/results/kernels_h200.md``.

``group_m`` (the tile order, ``sparse_moe_triton.tile_ids``) is 0, the plain order, in every row:
grouped orders and 64-row prefill blocks are in the sweep but have not been timed on a GPU yet.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = [
    "GemmConfig",
    "SparseMoEConfig",
    "SPARSE_MOE_CONFIGS",
    "sparse_moe_config",
    "sweep_candidates",
    "SWEEP_GROUP_M",
    "topk_routing_blocks",
    "router_logits_blocks",
    "next_power_of_2",
    "fp8_block_k",
    "sparse_moe_fp8_config",
]


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class GemmConfig:
    """Tile of one grouped GEMM (its M tile is the alignment block shared by both GEMMs)."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 0  # tile order: 0 = every M block per N tile, G = G M blocks through all N tiles

    def __post_init__(self):
        for name in ("block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"GemmConfig.{name} must be a power of two >= 16 (tl.dot's minimum), got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"GemmConfig.num_warps must be one of 1, 2, 4, 8, 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"GemmConfig.num_stages must be >= 1, got {self.num_stages}")
        if self.group_m < 0:
            raise ValueError(f"GemmConfig.group_m must be >= 0 (0: no grouping), got {self.group_m}")


@dataclass(frozen=True)
class SparseMoEConfig:
    """Blocks of the SparseMoE kernels: the alignment block (M tile) and each GEMM's N/K tiles."""

    block_m: int
    gate_up: GemmConfig
    down: GemmConfig
    combine_block_d: int = 1024

    def __post_init__(self):
        if self.block_m < 16 or self.block_m & (self.block_m - 1):
            raise ValueError(f"SparseMoEConfig.block_m must be a power of two >= 16, got {self.block_m}")
        if self.combine_block_d < 16 or self.combine_block_d & (self.combine_block_d - 1):
            raise ValueError(
                f"SparseMoEConfig.combine_block_d must be a power of two >= 16, got {self.combine_block_d}"
            )


# (largest average rows per expert T*K/E of the bucket, config); the last bucket has no bound.
SPARSE_MOE_CONFIGS: tuple[tuple[float | None, SparseMoEConfig], ...] = (
    (16, SparseMoEConfig(16, gate_up=GemmConfig(64, 128, 4, 4), down=GemmConfig(32, 256, 4, 4))),
    (64, SparseMoEConfig(32, gate_up=GemmConfig(64, 128, 4, 4), down=GemmConfig(64, 128, 4, 4))),
    (256, SparseMoEConfig(128, gate_up=GemmConfig(128, 64, 8, 3), down=GemmConfig(128, 64, 8, 3))),
    (None, SparseMoEConfig(128, gate_up=GemmConfig(128, 64, 8, 3), down=GemmConfig(256, 64, 8, 3))),
)


# The candidates ``benchmarks/bench_kernels_h200.py --tune`` times, as (block_n, block_k, num_warps,
# num_stages) per GEMM and regime; every one compiles for sm_90 within 227 KB of shared memory and
# without spills (tests/moetrt/kernels/test_kernels_compile.py), so a sweep spends no GPU time on
# tiles that cannot launch.
# Decode (<= 64 rows per expert) streams weights: narrow N tiles, long K, deep pipelines.
_DECODE_TILES = (
    ((32, 128, 4, 4), (64, 128, 4, 4), (64, 256, 4, 3), (64, 64, 4, 4), (128, 64, 4, 3), (32, 256, 4, 3)),
    ((32, 256, 4, 4), (32, 256, 4, 3), (64, 128, 4, 4), (16, 256, 4, 4), (64, 256, 4, 3)),
)
# 128-row blocks are compute-bound: wide tiles, 8 warps for the two gate|up accumulators.
_PREFILL_TILES = (
    ((64, 64, 8, 3), (128, 64, 8, 3), (128, 64, 8, 4), (64, 128, 8, 3), (128, 32, 8, 4)),
    ((128, 64, 8, 3), (256, 64, 8, 3), (128, 64, 8, 4), (256, 32, 8, 4), (128, 128, 8, 3)),
)
# 64-row blocks (one warpgroup's MMA height) for ~128 rows per expert, where 128-row blocks split an
# expert with a few rows over 128 into a second, nearly empty block: 4 warps hold a 64 x 256 tile
# (gate|up: two 64 x 128 accumulators), 8 warps split N.
_PREFILL_64_TILES = (
    ((128, 64, 4, 3), (128, 64, 4, 4), (64, 64, 4, 4), (256, 64, 8, 3), (64, 128, 4, 3)),
    ((256, 64, 4, 3), (128, 64, 4, 4), (256, 64, 8, 3), (128, 128, 4, 3), (256, 32, 4, 4)),
)
SWEEP_GROUP_M = (4, 8, 16)  # grouped tile orders tried on the best tiles past 64 rows per expert


def sweep_candidates(rows_per_expert: float) -> list[tuple[int, list[GemmConfig], list[GemmConfig]]]:
    """``[(block_m, gate|up tiles, down tiles)]`` the tuner times at ``rows_per_expert`` (T * K / E).

    Up to 16 rows: 16-row blocks; to 64: 16 and 32; to 256: 64 and 128 (at ~128 rows per expert a
    128-row block splits every expert with a few rows more into two blocks); past 256: 128-row
    blocks (256-row blocks lost at T = 512 and 4096 in the H200 sweeps, and every candidate costs a
    compile).
    """
    def tiles(pair):
        return [GemmConfig(*t) for t in pair[0]], [GemmConfig(*t) for t in pair[1]]

    if rows_per_expert <= 64:
        return [(bm, *tiles(_DECODE_TILES)) for bm in ([16] if rows_per_expert <= 16 else [16, 32])]
    if rows_per_expert <= 256:
        return [(64, *tiles(_PREFILL_64_TILES)), (128, *tiles(_PREFILL_TILES))]
    return [(128, *tiles(_PREFILL_TILES))]


def sparse_moe_config(num_tokens: int, num_experts: int, k: int, element_size: int = 2) -> SparseMoEConfig:
    """The table's config for ``num_tokens`` tokens routed to ``k`` of ``num_experts`` experts.

    The table is for 2-byte inputs (bf16, fp16); 4-byte inputs (fp32, for testing) get K tiles
    of the same bytes, so their pipelines fit the same shared memory.
    """
    rows_per_expert = num_tokens * k / max(num_experts, 1)
    config = next(c for bound, c in SPARSE_MOE_CONFIGS if bound is None or rows_per_expert <= bound)
    if element_size <= 2:
        return config
    shrink = lambda g: replace(g, block_k=max(16, g.block_k * 2 // element_size))  # noqa: E731
    return replace(config, gate_up=shrink(config.gate_up), down=shrink(config.down))


def topk_routing_blocks(num_tokens: int | None, num_experts: int) -> tuple[int, int, int]:
    """``(BLOCK_T, BLOCK_E, num_warps)`` of the routing kernel.

    One program holds ``BLOCK_T`` rows of all ``E`` scores (``BLOCK_E``, the next power of two):
    about 2048 scores a program, 16 a thread at 4 warps, so E = 256 still fits in registers.
    ``num_tokens=None`` (ahead-of-time compiles, where T is only known at run time) gives the
    largest block; a known small T shrinks it so a decode step is one small program.
    """
    block_e = next_power_of_2(num_experts)
    block_t = max(1, min(64, 2048 // block_e))
    if num_tokens is not None:
        block_t = min(block_t, next_power_of_2(max(num_tokens, 1)))
    num_warps = 4 if block_t * block_e >= 1024 else (2 if block_t * block_e >= 256 else 1)
    return block_t, block_e, num_warps


def router_logits_blocks(num_tokens: int, num_experts: int, dim: int) -> tuple[int, int, int, bool, int]:
    """``(BLOCK_T, BLOCK_E, BLOCK_K, USE_DOT, num_warps)`` of the router-logits kernel.

    16 or more tokens and experts: ``tl.dot`` on 32 x 32 fp32 tiles (16 x 64 for wide routers),
    whose FMA loop wastes nothing there. Fewer (a decode step, or E = 8 as in Mixtral): a
    broadcast product of about 4096 values a step (32 a thread at 4 warps), accumulated over the
    K loop and summed once at the end, with no 16-row minimum; one program then covers up to 16
    experts and ``64 // BLOCK_E`` tokens (8 for Mixtral's 8 experts), and the rest of the budget
    goes to a long K tile so a decode step is a few wide loads.
    """
    if num_tokens >= 16 and num_experts >= 16:
        block_e = min(next_power_of_2(num_experts), 64)
        block_t = 32 if block_e <= 32 else 16
        return block_t, block_e, 32, True, 4
    block_e = min(next_power_of_2(num_experts), 16)
    block_t = min(next_power_of_2(max(num_tokens, 1)), max(1, 64 // block_e))
    block_k = min(max(next_power_of_2(dim), 16), max(16, 4096 // (block_t * block_e)))
    return block_t, block_e, block_k, False, 4


# FP8 experts: the K tile is at most 128 e4m3 values (the bytes of a 64-wide bf16 tile, half those of the
# 128-wide decode tiles) and lies inside one scale block, so every tile has one activation and one weight
# scale per row and column. The M and N tiles are the bf16 table's; neither has been timed on a GPU yet.
FP8_MAX_BLOCK_K = 128
FP8_MIN_BLOCK_K = 32  # one FP8 MMA's K (wgmma and mma.sync m16n8k32)


def fp8_block_k(*scale_block_cols: int) -> int:
    """The FP8 GEMMs' K tile for activation / weight scale blocks of these many columns.

    The largest power of two up to 128 that divides every block that is narrower than its row
    (a block covering a whole row, per-token or per-channel, constrains nothing). Raises
    ``ValueError`` when that is below 32: a scale block must be a multiple of 32 columns.
    """
    block_k = FP8_MAX_BLOCK_K
    for cols in scale_block_cols:
        while cols % block_k:
            block_k //= 2
    if block_k < FP8_MIN_BLOCK_K:
        raise ValueError(
            f"FP8 scale blocks of {sorted(set(scale_block_cols))} columns: the FP8 kernels need blocks of a multiple "
            f"of {FP8_MIN_BLOCK_K} columns (DeepSeek-V3's weight_block_size is [128, 128])"
        )
    return block_k


def sparse_moe_fp8_config(num_tokens: int, num_experts: int, k: int, block_k: int) -> SparseMoEConfig:
    """The bf16 table's row for ``num_tokens``, with FP8 K tiles of ``block_k`` (:func:`fp8_block_k`)."""
    config = sparse_moe_config(num_tokens, num_experts, k, 2)
    return replace(config, gate_up=replace(config.gate_up, block_k=block_k), down=replace(config.down, block_k=block_k))
