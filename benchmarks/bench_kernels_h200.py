#!/usr/bin/env python3
"""moetrt's Triton MoE kernels on one GPU (written for an H200) against transformers and the floor.

One run measures, in this order, writing results after each part:

1. the device: copy bandwidth (a 1 GiB bf16 copy, bytes read + written) and the bf16 matmul rate
   (cuBLAS ``torch.mm``, best of two large shapes), both medians of ``triton.testing.do_bench``;
2. one MoE block with Mixtral-8x7B's sizes (D 4096, F 14336, 8 experts, top-2, bf16) at
   T in {1, 8, 64, 512, 4096} tokens:
   - ours: the router-logits kernel (fp32 logits from bf16 x, as moetrt's model on CUDA) + the
     Triton ``TopKRouting`` kernel + the Triton ``SparseMoE`` kernels, plain and captured in a CUDA
     graph; the same with the router's PyTorch form (``F.linear(x.float(), gate.float())``); and
     the experts kernels alone;
   - transformers' ``MixtralSparseMoeBlock`` with its ``eager``, ``batched_mm`` and
     ``grouped_mm`` experts implementations (and ``grouped_mm`` in a CUDA graph);
   - moetrt's torch op without Triton (the eager per-expert loop), for reference;
   - the floor: max(bytes / copy bandwidth, FLOPs / matmul rate) with bytes = weights of the
     experts actually hit + router weights + activations in and out, FLOPs = 2*T*k*3*D*F;
   - accuracy: relative Frobenius error against an fp32 computation from the same bf16
     weights, for the whole block and for the experts alone given the reference routing;
3. greedy decode of a 4-layer model of those sizes (vocab 32000, 32 heads, 8 KV heads, prompt
   512, 64 new tokens): moetrt's torch back end on CUDA (Triton kernels, static KV cache, one
   CUDA graph per decode step, through the runtime's generate loop), moetrt's model in a plain
   eager loop with and without the kernels, against transformers' ``generate`` with
   ``grouped_mm`` and ``eager`` experts; the floor is the copy bandwidth over the bytes one
   decode step must read (all non-expert weights but the embedding table, the k routed experts
   of each layer, the KV cache);
FP8 experts (``--skip-fp8`` leaves them out): part 1 also measures the e4m3 matmul rate
(``torch._scaled_mm``, per-tensor scales) where the GPU has FP8 tensor cores; part 2 also times
the block with FP8 experts (``sparse_moe_fp8_triton``: e4m3 weights in 128 x 128 blocks as
DeepSeek-V3 ships them, activations quantized per token; and per-channel weight scales) against
our bf16 block and the FP8 floor (expert bytes at one byte a weight, FLOPs at the e4m3 rate), with
its relative error against the fp32 block; part 3 also decodes with ``expert_precision="fp8"``
(on a copy of the model, right after the bf16 CUDA-graph decode it is compared with). The issue's targets: FP8 block <= 0.6x our bf16
block at T <= 64 and <= 0.65x at T = 4096, FP8 greedy decode >= 1.6x our bf16 decode.

4. with ``--tune`` (run first, before parts 2 and 3): block configs of the SparseMoE kernels per T
   in ``--tune-tokens`` (the candidates of ``configs.sweep_candidates``, then grouped tile orders),
   printed as rows for ``moetrt/ops/kernels/configs.py``; parts 2 and 3
   then run with the tuned configs (the T nearest in log scale), and the table's own configs are
   timed beside them in part 2 as "ours block (table)".

Usage (repository root; the GPU machine needs torch with CUDA, triton, transformers; no network)::

    python benchmarks/bench_kernels_h200.py                  # all of it, a few minutes
    python benchmarks/bench_kernels_h200.py --quick          # T in {1, 64, 4096}, shorter decode
    python benchmarks/bench_kernels_h200.py --tune                     # tune, then all of it with the tuned configs
    python benchmarks/bench_kernels_h200.py --smoke          # tiny sizes; runs on a CPU (interpreter)

Results go to ``--out``, else ``$OUT``, else ``benchmarks/_work/``: ``bench_kernels_h200.json``
(every number, versions, errors of any part that failed) and ``bench_kernels_h200.md`` (tables).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the working tree's moetrt, installed or not

FULL = {"hidden": 4096, "ffn": 14336, "experts": 8, "k": 2, "vocab": 32000, "layers": 4, "heads": 32, "kv_heads": 8}
SMOKE = {"hidden": 64, "ffn": 96, "experts": 8, "k": 2, "vocab": 512, "layers": 2, "heads": 4, "kv_heads": 2}
H200_SPEC = {"hbm_bytes_per_s": 4.8e12, "bf16_dense_flops_per_s": 989e12}  # datasheet, for context only
TARGET_BLOCK_X_FLOOR = 1.3  # issue target: <= 1.3x the floor at every T
TARGET_DECODE_OF_FLOOR = 0.5  # issue target: >= 50% of the decode floor
TARGET_FP8_SMALL_T = 0.6  # issue target: FP8 block <= 0.6x our bf16 block at T = 1..64
TARGET_FP8_LARGE_T = 0.65  # issue target: FP8 block <= 0.65x our bf16 block at T = 4096
TARGET_FP8_DECODE = 1.6  # issue target: FP8 greedy decode >= 1.6x our bf16 decode
SMI_FIELDS = "name,driver_version,clocks.max.sm,clocks.max.mem,power.limit"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="results folder (default: $OUT, else benchmarks/_work)")
    p.add_argument("--tokens", default="1,8,64,512,4096", help="token counts of the MoE block")
    p.add_argument("--quick", action="store_true", help="T in {1, 64, 4096}, 32 new tokens, no batched_mm")
    p.add_argument("--skip-block", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--no-graphs", action="store_true", help="skip CUDA-graph timings")
    p.add_argument("--tune", action="store_true", help="sweep SparseMoE block configs per T first, then use them")
    p.add_argument("--tune-tokens", default="1,64,512,4096", help="token counts to tune (with --tune)")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to check this script (CPU: Triton interpreter)")
    p.add_argument("--skip-fp8", action="store_true", help="leave out the FP8-expert rows and the FP8 decode")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens = "1,64,4096" if args.tokens == "1,8,64,512,4096" else args.tokens
        args.new_tokens = min(args.new_tokens, 32)
    if args.smoke:
        args.tokens = "1,5,33" if args.tokens == "1,8,64,512,4096" else args.tokens
        args.prompt, args.new_tokens = min(args.prompt, 16), min(args.new_tokens, 6)
    args.tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    args.tune_tokens = [int(t) for t in args.tune_tokens.split(",") if t.strip()]
    if args.smoke and args.tune_tokens == [1, 64, 512, 4096]:
        args.tune_tokens = [1, 300]  # a decode row and a prefill row (75 rows per expert)
    args.out = args.out or Path(os.environ.get("OUT") or REPO / "benchmarks" / "_work")
    return args


# --- plumbing --------------------------------------------------------------------------------------
class Run:
    """Holds the results; writes JSON and markdown after every part so a crash loses nothing."""

    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.data: dict = {"meta": {}, "hardware": {}, "moe_block": [], "e2e": {}, "tune": [], "failures": []}

    def part(self, name, fn, *a, **kw):
        print(f"\n=== {name} ===", flush=True)
        started = time.perf_counter()
        try:
            return fn(*a, **kw)
        except Exception as exc:  # keep going: later parts still run and everything is recorded
            print(f"!!! {name} failed: {type(exc).__name__}: {exc}", flush=True)
            self.data["failures"].append(
                {"part": name, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            )
            return None
        finally:
            seconds = time.perf_counter() - started
            self.data.setdefault("part_seconds", {})[name] = round(seconds, 1)
            print(f"--- {name}: {seconds:.1f} s", flush=True)
            self.save()

    def save(self):
        (self.out / "bench_kernels_h200.json").write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        (self.out / "bench_kernels_h200.md").write_text(markdown(self.data))


def make_bench(torch, cuda: bool):
    """``bench(fn) -> median ms``: triton's do_bench on CUDA (L2 flushed between calls); a wall clock elsewhere."""
    if cuda:
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def wall(fn, repeat=3):
        fn()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[len(times) // 2]

    return wall


def capture_graph(torch, fn):
    """Warm ``fn`` up on a side stream, capture one call in a CUDA graph; returns (graph, its output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize()
    return graph, out


def time_graph(torch, bench, row, name, fn, y_ref) -> None:
    """Capture ``fn`` in a CUDA graph; its replay's error against ``y_ref`` and median time go into ``row``."""
    try:
        graph, out = capture_graph(torch, fn)
        graph.replay()
        torch.cuda.synchronize()
        row["errors"][name] = rel_fro(torch, out, y_ref)
        row["times_ms"][name] = bench(graph.replay)
    except Exception as exc:
        row["notes"][name] = f"{type(exc).__name__}: {exc}"[:300]


def rel_fro(torch, ours, ref) -> float:
    ours, ref = ours.double(), ref.double()
    return float(torch.linalg.norm(ours - ref) / torch.linalg.norm(ref).clamp(min=1e-300))


def free_memory(torch, cuda):
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# --- 0. versions -----------------------------------------------------------------------------------
def collect_meta(run, torch, cuda, args):
    import triton

    meta = {
        "argv": sys.argv[1:],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton.__version__,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        meta["transformers"] = None
    try:
        meta["moetrt_commit"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        meta["moetrt_commit"] = None
    if cuda:
        props = torch.cuda.get_device_properties(0)
        meta["fp32_matmul_allows_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
        meta.update(
            gpu=props.name, sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
        )  # fmt: skip
        try:
            meta["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            ).stdout.strip()  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            meta["nvidia_smi"] = None
    else:
        meta["gpu"] = None
    run.data["meta"] = meta
    print(json.dumps(meta, indent=1))


# --- 1. the device -------------------------------------------------------------------------------
def copy_rate(torch, dev, elements, bench) -> float:
    """Bytes per second of a device-to-device copy (bytes read + bytes written)."""
    src = torch.ones(elements, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def matmul_rate(torch, dev, m, n, k, bench) -> float:
    """FLOP/s of a bf16 [m, k] @ [k, n] cuBLAS matmul."""
    a = torch.randn(m, k, device=dev).to(torch.bfloat16)
    b = torch.randn(k, n, device=dev).to(torch.bfloat16)
    ms = bench(lambda: torch.mm(a, b))
    return 2 * m * n * k / (ms * 1e-3)


def fp8_matmul_rate(torch, m, n, k, bench) -> float:
    """FLOP/s of an e4m3 [m, k] @ [k, n] matmul with per-tensor scales (cuBLASLt through ``torch._scaled_mm``)."""
    a = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn).t()  # column-major, as cuBLASLt wants it
    one = torch.ones((), device="cuda")
    ms = bench(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
    return 2 * m * n * k / (ms * 1e-3)


def measure_hardware(run, torch, cuda, bench, smoke):
    dev = "cuda" if cuda else "cpu"
    copy_bw = copy_rate(torch, dev, (1 << 20) if smoke else (1 << 29), bench)  # bf16 elements: 2 MiB / 1 GiB
    free_memory(torch, cuda)
    shapes = [(256, 256, 256)] if smoke else [(8192, 8192, 8192), (16384, 8192, 8192)]
    rates = [matmul_rate(torch, dev, m, n, k, bench) for m, n, k in shapes]
    hw = {
        "copy_bytes_per_s": copy_bw,
        "bf16_matmul_flops_per_s": max(rates),
        "matmul_shapes": shapes,
        "matmul_rates": rates,
        "copy_of_spec": copy_bw / H200_SPEC["hbm_bytes_per_s"],
        "matmul_of_spec": max(rates) / H200_SPEC["bf16_dense_flops_per_s"],
    }
    if cuda and torch.cuda.get_device_capability() >= (8, 9):
        try:
            hw["fp8_matmul_flops_per_s"] = max(fp8_matmul_rate(torch, m, n, k, bench) for m, n, k in shapes)
            print(f"e4m3 matmul {hw['fp8_matmul_flops_per_s'] / 1e12:.1f} TFLOP/s")
        except Exception as exc:  # an FP8 floor then assumes twice the bf16 rate (noted in the results)
            hw["fp8_matmul_note"] = f"torch._scaled_mm failed: {type(exc).__name__}: {exc}"[:300]
    run.data["hardware"] = hw
    print(f"copy {copy_bw / 1e12:.3f} TB/s ({hw['copy_of_spec']:.0%} of 4.8 spec)")
    print(f"bf16 matmul {max(rates) / 1e12:.1f} TFLOP/s ({hw['matmul_of_spec']:.0%} of 989 spec)")
    free_memory(torch, cuda)
    return hw


def floor_seconds(hw, tokens, hit, dims):
    d, f, e, k = dims["hidden"], dims["ffn"], dims["experts"], dims["k"]
    nbytes = hit * 3 * d * f * 2 + e * d * 2 + 2 * tokens * d * 2  # experts hit + router + x in, y out (bf16)
    flops = 2 * tokens * k * 3 * d * f
    t_bytes, t_flops = nbytes / hw["copy_bytes_per_s"], flops / hw["bf16_matmul_flops_per_s"]
    return max(t_bytes, t_flops), {"bytes": nbytes, "flops": flops, "bytes_s": t_bytes, "flops_s": t_flops}


def fp8_floor_seconds(hw, tokens, hit, dims):
    """The FP8 block's floor: expert weights at 1 byte (+ a float32 scale per 128 x 128 block), FLOPs at the e4m3 rate."""
    d, f, e, k = dims["hidden"], dims["ffn"], dims["experts"], dims["k"]
    nbytes = hit * 3 * d * f * (1 + 4 / 128**2) + e * d * 2 + 2 * tokens * d * 2
    flops = 2 * tokens * k * 3 * d * f
    rate = hw.get("fp8_matmul_flops_per_s") or 2 * hw["bf16_matmul_flops_per_s"]
    t_bytes, t_flops = nbytes / hw["copy_bytes_per_s"], flops / rate
    return max(t_bytes, t_flops), {"bytes": nbytes, "flops": flops, "bytes_s": t_bytes, "flops_s": t_flops,
                                   "fp8_rate_measured": "fp8_matmul_flops_per_s" in hw}


# --- 2. one MoE block -------------------------------------------------------------------------------
def reference_block_fp32(torch, x, gate32, w_gate_up, w_down, k):
    """fp32 truth: fp32 router, the op's routing rule (stable sort), experts in fp32 from the bf16 weights."""
    import torch.nn.functional as F

    logits = F.linear(x.float(), gate32)  # [T, E]
    probs = torch.softmax(logits, dim=-1)
    indices = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :k]  # [T, K]
    weights = probs.gather(1, indices)
    weights = weights / weights.sum(-1, keepdim=True)
    return experts_fp32(torch, x, weights, indices, w_gate_up, w_down), weights, indices.to(torch.int32)


def experts_fp32(torch, x, weights, indices, w_gate_up, w_down):
    import torch.nn.functional as F

    ffn = w_down.shape[2]
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    flat = indices.reshape(-1).long()
    for e in flat.unique().tolist():
        pairs = (flat == e).nonzero().squeeze(1)
        tokens = pairs // indices.shape[1]
        gate_up = x[tokens].float() @ w_gate_up[e].float().t()  # [n, 2F]
        hidden = F.silu(gate_up[:, :ffn]) * gate_up[:, ffn:]
        y.index_add_(0, tokens, (hidden @ w_down[e].float().t()) * weights.reshape(-1)[pairs, None].float())
    return y


def moe_block(run, torch, cuda, bench, args, dims, hw):
    from types import SimpleNamespace

    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    dev = "cuda" if cuda else "cpu"
    d, f, e, k = dims["hidden"], dims["ffn"], dims["experts"], dims["k"]
    bf16 = torch.bfloat16
    if cuda and torch.backends.cuda.matmul.allow_tf32:
        print("note: TF32 is on for fp32 matmuls, so the fp32 reference is only ~1e-3 accurate", flush=True)
    g = torch.Generator(device=dev).manual_seed(0)
    w_gate_up = torch.randn(e, 2 * f, d, device=dev, generator=g, dtype=bf16).mul_(d**-0.5)  # [E, 2F, D]
    w_down = torch.randn(e, d, f, device=dev, generator=g, dtype=bf16).mul_(f**-0.5)  # [E, D, F]
    gate = torch.randn(e, d, device=dev, generator=g, dtype=bf16).mul_(d**-0.5)  # router [E, D]

    cfg = MixtralConfig(
        hidden_size=d, intermediate_size=f, num_local_experts=e, num_experts_per_tok=k, router_jitter_noise=0.0
    )
    cfg._experts_implementation = "eager"
    with torch.device("meta"):
        block = MixtralSparseMoeBlock(cfg)
    block = block.to_empty(device=dev).to(bf16).eval()
    with torch.no_grad():  # share the very same tensors
        block.experts.gate_up_proj.data = w_gate_up
        block.experts.down_proj.data = w_down
        block.gate.weight.data = gate
    ctx = SimpleNamespace(
        dev=dev, g=g, w_gate_up=w_gate_up, w_down=w_down, gate=gate, gate32=gate.float(), cfg=cfg, block=block,
        free_bytes=torch.cuda.mem_get_info()[0] if cuda else 8 << 30, fp8=None,
    )  # fmt: skip
    if not args.skip_fp8 and (not cuda or torch.cuda.get_device_capability() >= (8, 9)):
        from moetrt.fp8 import quantize_fp8_blocks, weight_block

        ctx.fp8 = {}  # the same weights in e4m3: 128 x 128 blocks (DeepSeek-V3's checkpoints), and per channel
        for scales in ("block", "channel"):
            blocks = weight_block(scales, tuple(w_gate_up.shape)), weight_block(scales, tuple(w_down.shape))
            ctx.fp8[scales] = (*quantize_fp8_blocks(w_gate_up, blocks[0]), *quantize_fp8_blocks(w_down, blocks[1]),
                               *blocks)
    for tokens in args.tokens:
        row = {"tokens": tokens, "times_ms": {}, "errors": {}, "notes": {}}
        run.data["moe_block"].append(row)
        with torch.no_grad():
            block_row(row, torch, cuda, bench, args, dims, hw, ctx)
        free_memory(torch, cuda)
        run.save()


def block_row(row, torch, cuda, bench, args, dims, hw, ctx):
    """Time and check every implementation at one token count; fills ``row``."""
    import torch.nn.functional as F

    import moetrt.ops.kernels.sparse_moe_triton as kernels_module
    from moetrt.ops import sparse_moe_eager
    from moetrt.ops.kernels import configs
    from moetrt.ops.kernels.router_logits_triton import router_logits_triton
    from moetrt.ops.kernels.sparse_moe_triton import sparse_moe_triton
    from moetrt.ops.kernels.topk_routing_triton import topk_routing_triton

    tokens, (d, f, e, k) = row["tokens"], (dims["hidden"], dims["ffn"], dims["experts"], dims["k"])
    w_gate_up, w_down, gate32, block = ctx.w_gate_up, ctx.w_down, ctx.gate32, ctx.block
    row["config"] = repr(kernels_module.sparse_moe_config(tokens, e, k))  # the tuned one under --tune
    table_config = configs.sparse_moe_config(tokens, e, k)
    x = torch.randn(tokens, d, device=ctx.dev, generator=ctx.g, dtype=torch.bfloat16)  # [T, D]
    x3 = x[None]  # [1, T, D]
    y_ref, w_ref, i_ref = reference_block_fp32(torch, x, gate32, w_gate_up, w_down, k)
    hit = int(i_ref.unique().numel())
    floor_s, floor_parts = floor_seconds(hw, tokens, hit, dims)
    row.update(experts_hit=hit, floor_ms=floor_s * 1e3, floor=floor_parts)
    times, errors, notes = row["times_ms"], row["errors"], row["notes"]

    def ours_block():
        logits = router_logits_triton(x, ctx.gate)  # [T, E] fp32 router from bf16 x, as moetrt's model on CUDA
        weights, indices = topk_routing_triton(logits, k, "softmax", True, 1.0)
        return sparse_moe_triton(x, weights, indices, w_gate_up, w_down)

    def ours_block_torch_router():
        logits = F.linear(x.float(), gate32)  # [T, E] the router's PyTorch form: an fp32 copy of x, fp32 matmul
        weights, indices = topk_routing_triton(logits, k, "softmax", True, 1.0)
        return sparse_moe_triton(x, weights, indices, w_gate_up, w_down)

    def ours_experts():
        return sparse_moe_triton(x, w_ref, i_ref, w_gate_up, w_down)

    def torch_op():
        return sparse_moe_eager(x, w_ref, i_ref, w_gate_up, w_down)

    def hf_block():
        out = block(x3)
        return (out[0] if isinstance(out, tuple) else out)[0]  # [T, D]

    _, indices = topk_routing_triton(F.linear(x.float(), gate32), k, "softmax", True, 1.0)
    row["routing_rows_equal_reference"] = float((indices == i_ref).all(dim=1).float().mean())
    errors["ours block"] = rel_fro(torch, ours_block(), y_ref)
    errors["ours experts"] = rel_fro(torch, ours_experts(), y_ref)
    times["ours block"] = bench(ours_block)
    errors["ours block (torch router)"] = rel_fro(torch, ours_block_torch_router(), y_ref)
    times["ours block (torch router)"] = bench(ours_block_torch_router)
    times["ours experts"] = bench(ours_experts)
    if repr(table_config) != row["config"]:
        times["ours block (table)"] = bench(
            lambda: sparse_moe_triton(
                x, *topk_routing_triton(router_logits_triton(x, ctx.gate), k, "softmax", True, 1.0), w_gate_up, w_down,
                config=table_config,
            )
        )
    if cuda and not args.no_graphs:
        time_graph(torch, bench, row, "ours block (graph)", ours_block, y_ref)
    errors["torch op experts (no Triton)"] = rel_fro(torch, torch_op(), y_ref)
    times["torch op experts (no Triton)"] = bench(torch_op)
    if ctx.fp8 is not None:
        fp8_rows(row, torch, cuda, bench, args, dims, hw, ctx, x, y_ref, w_ref, i_ref, hit)

    for impl in ("eager", "batched_mm", "grouped_mm"):
        name = f"hf {impl}"
        gather = tokens * k * 3 * d * f * 2  # batched_mm gathers one weight copy per (token, slot)
        if impl == "batched_mm" and (args.quick or gather > 0.5 * ctx.free_bytes):
            notes[name] = f"skipped: would gather {gather / 2**30:.1f} GiB of expert weights"
            continue
        try:
            ctx.cfg._experts_implementation = impl
            errors[name] = rel_fro(torch, hf_block(), y_ref)
            errors[f"{name} experts"] = rel_fro(torch, block.experts(x, i_ref.long(), w_ref), y_ref)
            times[name] = bench(hf_block)
            if impl == "grouped_mm" and cuda and not args.no_graphs:
                try:
                    graph, _ = capture_graph(torch, hf_block)
                    times[f"{name} (graph)"] = bench(graph.replay)
                except Exception as exc:
                    notes[f"{name} (graph)"] = f"{type(exc).__name__}: {exc}"[:300]
        except Exception as exc:
            notes[name] = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            ctx.cfg._experts_implementation = "eager"
            free_memory(torch, cuda)

    ours_best = min(v for key, v in times.items() if key.startswith("ours block") and "fp8" not in key)
    hf_times = [v for key, v in times.items() if key.startswith("hf ")]
    row["ours_best_x_floor"] = ours_best / row["floor_ms"]
    row["hf_best_x_floor"] = min(hf_times) / row["floor_ms"] if hf_times else None
    row["meets_target"] = row["ours_best_x_floor"] <= TARGET_BLOCK_X_FLOOR
    fp8_times = [v for key, v in times.items() if key.startswith("ours fp8 block")]
    if fp8_times:
        row["fp8_best_x_bf16"] = min(fp8_times) / ours_best
        row["fp8_best_x_fp8_floor"] = min(fp8_times) / row["fp8_floor_ms"]
        target = TARGET_FP8_SMALL_T if tokens <= 64 else TARGET_FP8_LARGE_T if tokens >= 4096 else None
        row["fp8_target_x_bf16"] = target
        row["fp8_meets_target"] = None if target is None else row["fp8_best_x_bf16"] <= target
    print(f"T={tokens} experts hit {hit}, floor {row['floor_ms'] * 1e3:.1f} us", flush=True)
    for key, v in times.items():
        print(
            f"  {key:32s} {v * 1e3:10.1f} us  {v / row['floor_ms']:6.2f}x floor  "
            f"err {errors.get(key, float('nan')):.2e}"
        )
    for key, v in notes.items():
        print(f"  {key}: {v}")


def fp8_rows(row, torch, cuda, bench, args, dims, hw, ctx, x, y_ref, w_ref, i_ref, hit):
    """The block with FP8 experts at one token count: times, errors against fp32, the FP8 floor."""
    from moetrt.ops.kernels.router_logits_triton import router_logits_triton
    from moetrt.ops.kernels.sparse_moe_fp8_triton import sparse_moe_fp8_triton
    from moetrt.ops.kernels.topk_routing_triton import topk_routing_triton

    times, errors, notes, k = row["times_ms"], row["errors"], row["notes"], dims["k"]
    floor_s, parts = fp8_floor_seconds(hw, row["tokens"], hit, dims)
    row.update(fp8_floor_ms=floor_s * 1e3, fp8_floor=parts)

    def fp8_block(scales="block"):
        logits = router_logits_triton(x, ctx.gate)
        weights, indices = topk_routing_triton(logits, k, "softmax", True, 1.0)
        return sparse_moe_fp8_triton(x, weights, indices, *ctx.fp8[scales])

    def fp8_experts(scales="block", activation_scales="token"):
        return sparse_moe_fp8_triton(x, w_ref, i_ref, *ctx.fp8[scales], activation_scales)

    try:
        errors["ours fp8 block"] = rel_fro(torch, fp8_block(), y_ref)
        times["ours fp8 block"] = bench(fp8_block)
        errors["ours fp8 experts"] = rel_fro(torch, fp8_experts(), y_ref)
        times["ours fp8 experts"] = bench(fp8_experts)
        errors["ours fp8 experts (128-col act scales)"] = rel_fro(torch, fp8_experts("block", "block"), y_ref)
        times["ours fp8 experts (128-col act scales)"] = bench(lambda: fp8_experts("block", "block"))
        errors["ours fp8 experts (channel scales)"] = rel_fro(torch, fp8_experts("channel"), y_ref)
        times["ours fp8 experts (channel scales)"] = bench(lambda: fp8_experts("channel"))
        if cuda and not args.no_graphs:
            time_graph(torch, bench, row, "ours fp8 block (graph)", fp8_block, y_ref)
    except Exception as exc:
        notes["ours fp8"] = f"{type(exc).__name__}: {exc}"[:300]
        print(f"!!! fp8 rows: {type(exc).__name__}: {exc}", flush=True)


# --- 3. greedy decode end to end ------------------------------------------------------------------
def decode_floor(model, hw, prompt, new_tokens) -> dict:
    """Bytes one decode step must read at batch 1, and the tokens/s the copy bandwidth allows."""
    cfg = model.config
    per_step = 0
    for name, param in model.named_parameters():
        if ".experts." in name or "embed_tokens" in name:
            continue
        per_step += param.numel()
    moe_layers = sum(1 for layer in model.layers if layer.is_moe)
    per_step += moe_layers * cfg.num_experts_per_tok * 3 * cfg.hidden_size * cfg.intermediate_size + cfg.hidden_size
    mean_past = prompt + new_tokens / 2
    kv = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * mean_past
    nbytes = 2 * (per_step + kv)
    expert_bytes = 2 * moe_layers * cfg.num_experts_per_tok * 3 * cfg.hidden_size * cfg.intermediate_size
    fp8_bytes = nbytes - expert_bytes / 2  # the routed experts' weights at one byte each (scales: 1/4096 more)
    return {"bytes_per_step": nbytes, "floor_tokens_per_s": hw["copy_bytes_per_s"] / nbytes,
            "fp8_bytes_per_step": fp8_bytes, "fp8_floor_tokens_per_s": hw["copy_bytes_per_s"] / fp8_bytes}


def timed_generate(torch, cuda, generate, new):
    """(seconds for 1 new token, seconds for ``new``, the tokens): decode rate = (new - 1) / difference."""

    def sync():
        if cuda:
            torch.cuda.synchronize()

    generate(2)  # warm up (and compile kernels)
    sync()
    start = time.perf_counter()
    generate(1)
    sync()
    t1 = time.perf_counter() - start
    start = time.perf_counter()
    tokens = generate(new)
    sync()
    return t1, time.perf_counter() - start, tokens


def record_generate(result, name, t1, tn, tokens):
    new = result["new_tokens"]
    rate = (new - 1) / (tn - t1) if tn > t1 else float("nan")  # nan: timing noise larger than the decode
    result["runs"][name] = {
        "prefill_plus_1_s": t1,
        f"total_{new}_s": tn,
        "decode_tokens_per_s": rate,
        "tokens": tokens[0].tolist(),
    }
    print(f"{name:34s} prefill+1 {t1 * 1e3:8.1f} ms  decode {rate:8.1f} tok/s", flush=True)


def run_transformers(result, torch, cuda, hf, prompt, reference):
    @torch.no_grad()
    def generate(n):
        out = hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n, do_sample=False,
            pad_token_id=0,
        )  # fmt: skip
        return out[:, prompt.shape[1] :]

    for impl in ("grouped_mm", "eager"):
        try:
            hf.set_experts_implementation(impl)
            name = f"transformers generate ({impl})"
            record_generate(result, name, *timed_generate(torch, cuda, generate, result["new_tokens"]))
            with torch.no_grad():
                record_error(result, torch, name, hf(prompt).logits, reference)
        except Exception as exc:
            result["notes"][f"transformers {impl}"] = f"{type(exc).__name__}: {exc}"[:300]
        free_memory(torch, cuda)
    result["notes"]["transformers batched_mm"] = (
        "not run: its prefill gathers a copy of the expert weights per (token, slot)"
    )


FP8_DECODE = "moetrt torch back end, FP8 experts (Triton + CUDA graphs)"
BF16_DECODE = "moetrt torch back end (Triton + CUDA graphs)"


def run_moetrt(result, torch, cuda, ours, prompt, reference, args):
    from moetrt.ops.kernels import maybe_register_cuda_kernels
    from moetrt.runtime.backend_torch import TorchBackend
    from moetrt.runtime.generate import Generation, SamplingOptions

    @torch.no_grad()
    def generate(n):
        out = ours(prompt, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = [token]
        for _ in range(n - 1):
            out = ours(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
        return torch.cat(tokens, dim=1)

    new = result["new_tokens"]
    record_generate(result, "moetrt torch ops (no Triton)", *timed_generate(torch, cuda, generate, new))
    with torch.no_grad():
        record_error(result, torch, "moetrt torch ops (no Triton)", ours(prompt).logits, reference)
    registered = maybe_register_cuda_kernels()
    result["notes"]["moetrt kernels"] = (
        "Triton kernels registered for CUDA (the eager loops call them op by op; the back end replays graphs)"
        if registered and cuda
        else "Triton kernels not in use (no CUDA or no triton): same as the torch ops"
    )
    record_generate(result, "moetrt + Triton kernels (eager loop)", *timed_generate(torch, cuda, generate, new))
    with torch.no_grad():
        record_error(result, torch, "moetrt + Triton kernels (eager loop)", ours(prompt).logits, reference)
    prompt_ids = [prompt[0].tolist()]
    variants = [  # (name, CUDA graphs, torch.compile of the captured step, expert precision)
        (BF16_DECODE, True, False, "model"),
        (FP8_DECODE, True, False, "fp8"),  # on a copy: expert_precision="fp8" converts the experts in place
        ("moetrt torch back end (Triton + CUDA graphs + torch.compile)", True, True, "model"),
        ("moetrt torch back end (no graphs)", False, False, "model"),
    ]
    if args.skip_fp8:
        variants = [v for v in variants if v[3] != "fp8"]
    for name, graphs, compiled, precision in variants if cuda else [v for v in variants if not v[1]]:
        try:
            backend = TorchBackend(
                copy.deepcopy(ours) if precision == "fp8" else ours, device="cuda" if cuda else "cpu",
                static_cache=True, cuda_graphs=graphs, compile_decode=compiled, expert_precision=precision,
            )

            def run_backend(n, backend=backend):
                generation = Generation(backend, prompt_ids, SamplingOptions(max_new_tokens=n))
                return torch.tensor(generation.run().tokens)

            started = time.perf_counter()
            run_backend(2)  # the first decode step captures (and compiles) the graph
            result["notes"][f"{name}: first call"] = f"{time.perf_counter() - started:.1f} s (capture, compile)"
            record_generate(result, name, *timed_generate(torch, cuda, run_backend, new))
            feeds = {"input_ids": prompt.cpu().numpy(), "attention_mask": torch.ones_like(prompt).cpu().numpy(),
                     "position_ids": torch.arange(prompt.shape[1])[None].numpy()}  # fmt: skip
            record_error(result, torch, name, backend.forward({**feeds, **backend.empty_past(1)})["logits"], reference)
        except Exception as exc:
            result["notes"][name] = f"failed: {type(exc).__name__}: {exc}"[:400]
            print(f"!!! {name}: {type(exc).__name__}: {exc}", flush=True)
        backend = None
        free_memory(torch, cuda)


def e2e_decode(run, torch, cuda, args, dims, hw):
    from transformers import MixtralConfig, MixtralForCausalLM

    from moetrt.checkpoint import from_pretrained

    dev = "cuda" if cuda else "cpu"
    bf16 = torch.bfloat16
    cfg = MixtralConfig(
        vocab_size=dims["vocab"], hidden_size=dims["hidden"], intermediate_size=dims["ffn"],
        num_hidden_layers=dims["layers"], num_attention_heads=dims["heads"], num_key_value_heads=dims["kv_heads"],
        num_local_experts=dims["experts"], num_experts_per_tok=dims["k"], max_position_embeddings=4096,
        tie_word_embeddings=False, router_jitter_noise=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(bf16)
    try:
        with torch.device(dev):
            hf = MixtralForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default_dtype)
    hf = hf.to(bf16).eval()
    with torch.no_grad():  # a well-conditioned random model: O(1) activations, so bf16 errors mean something
        g = torch.Generator(device=dev).manual_seed(0)
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:  # unit variance for embeddings, 1/sqrt(fan in) for projections and experts
                param.normal_(0.0, 1.0 if "embed_tokens" in name else param.shape[-1] ** -0.5, generator=g)
    generator = torch.Generator(device=dev).manual_seed(1)
    prompt = torch.randint(3, dims["vocab"], (1, args.prompt), device=dev, generator=generator)  # [1, P]
    result: dict = {"prompt": args.prompt, "new_tokens": args.new_tokens, "runs": {}, "notes": {}}
    run.data["e2e"] = result

    reference = fp32_reference(result, torch, hf, prompt, args.new_tokens)  # the same bf16 weights, upcast
    run_transformers(result, torch, cuda, hf, prompt, reference)
    ours = from_pretrained(hf, dtype=bf16).to(dev).eval()  # the same weights
    hf = None
    free_memory(torch, cuda)
    result.update(decode_floor(ours, hw, args.prompt, args.new_tokens))
    print(f"decode floor: {result['bytes_per_step'] / 1e9:.3f} GB a step -> {result['floor_tokens_per_s']:.0f} tok/s")
    run_moetrt(result, torch, cuda, ours, prompt, reference, args)
    runs = result["runs"]
    if FP8_DECODE in runs and BF16_DECODE in runs:
        result["fp8_decode_x_bf16"] = runs[FP8_DECODE]["decode_tokens_per_s"] / runs[BF16_DECODE]["decode_tokens_per_s"]
        result["fp8_decode_meets_target"] = result["fp8_decode_x_bf16"] >= TARGET_FP8_DECODE

    for name, entry in result["runs"].items():
        floor = result["fp8_floor_tokens_per_s" if name == FP8_DECODE else "floor_tokens_per_s"]
        entry["decode_of_floor"] = entry["decode_tokens_per_s"] / floor
        entry["meets_target"] = entry["decode_of_floor"] >= TARGET_DECODE_OF_FLOOR
        same = 0
        while same < min(len(reference["tokens"]), len(entry["tokens"])) and entry["tokens"][same] == reference["tokens"][same]:
            same += 1
        entry["leading_tokens_equal_to_fp32"] = same


def fp32_reference(result, torch, hf, prompt, new_tokens) -> dict:
    """moetrt's model in fp32 from the same (bf16) weights: prefill logits and greedy tokens, the truth."""
    from moetrt.checkpoint import from_pretrained

    model = from_pretrained(hf, dtype=torch.float32).to(prompt.device).eval()
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        logits = out.logits.float()  # [1, P, V]
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = [int(token)]
        for _ in range(new_tokens - 1):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))
    model = out = past = None
    free_memory(torch, prompt.is_cuda)
    result["notes"]["reference"] = (
        "moetrt's model in fp32 (upcast from the same bf16 weights, fp32 matmuls): prefill logits and greedy tokens"
    )
    result["reference_tokens"] = tokens
    return {"logits": logits, "tokens": tokens}


def record_error(result, torch, name, logits, reference):
    """Relative Frobenius error of one implementation's prefill logits against the fp32 reference."""
    logits = torch.as_tensor(logits, device=reference["logits"].device).float().reshape(reference["logits"].shape)
    result.setdefault("prefill_logits_error", {})[name] = rel_fro(torch, logits, reference["logits"])


# --- 4. tuning -------------------------------------------------------------------------------------


def tune(run, torch, cuda, bench, args, dims) -> dict:
    """Sweep configs per T of ``--tune-tokens``; returns {T: best SparseMoEConfig}."""
    dev = "cuda" if cuda else "cpu"
    d, f, e = dims["hidden"], dims["ffn"], dims["experts"]
    g = torch.Generator(device=dev).manual_seed(0)
    w_gate_up = torch.randn(e, 2 * f, d, device=dev, generator=g, dtype=torch.bfloat16).mul_(d**-0.5)
    w_down = torch.randn(e, d, f, device=dev, generator=g, dtype=torch.bfloat16).mul_(f**-0.5)
    best = {}
    for tokens in args.tune_tokens:
        entry, best[tokens] = tune_tokens(torch, bench, dims, tokens, w_gate_up, w_down, g)
        run.data["tune"].append(entry)
        print(f"T={tokens}: table {entry['default_ms']:.4f} ms -> best {entry['best_ms']:.4f} ms  {entry['best']}")
        run.save()
        free_memory(torch, cuda)
    return best


def use_tuned(run, tuned: dict) -> None:
    """Make the kernels pick, for any T, the tuned config of the nearest tuned T (in log scale)."""
    import math

    import moetrt.ops.kernels.sparse_moe_triton as kernels_module

    table = kernels_module.sparse_moe_config

    def tuned_config(num_tokens, num_experts, k, element_size=2):
        if element_size != 2 or not tuned:
            return table(num_tokens, num_experts, k, element_size)
        nearest = min(tuned, key=lambda t: abs(math.log(max(num_tokens, 1)) - math.log(t)))
        return tuned[nearest]

    kernels_module.sparse_moe_config = tuned_config
    run.data["meta"]["configs"] = {str(t): repr(c) for t, c in tuned.items()}
    print("parts 2 and 3 use the tuned configs:", run.data["meta"]["configs"], flush=True)


def tune_tokens(torch, bench, dims, tokens, w_gate_up, w_down, g) -> dict:
    """Per block_m the best gate|up tile, then the best down tile with it; past 64 rows per expert
    then the best tile order (``group_m``) of each GEMM."""
    from dataclasses import replace

    from moetrt.ops.kernels.configs import SWEEP_GROUP_M, SparseMoEConfig, sparse_moe_config, sweep_candidates
    from moetrt.ops.kernels.sparse_moe_triton import sparse_moe_triton
    from moetrt.ops.kernels.topk_routing_triton import topk_routing_triton

    d, e, k = dims["hidden"], dims["experts"], dims["k"]
    x = torch.randn(tokens, d, device=w_gate_up.device, generator=g, dtype=torch.bfloat16)
    logits = torch.randn(tokens, e, device=w_gate_up.device, generator=g)
    weights, indices = topk_routing_triton(logits, k, "softmax", True, 1.0)
    rows = tokens * k / e
    timings = []

    def time_config(config) -> float:
        try:
            ms = bench(lambda: sparse_moe_triton(x, weights, indices, w_gate_up, w_down, config=config))
        except Exception as exc:  # e.g. a tile that needs more shared memory than there is
            print(f"  {config}: {type(exc).__name__}: {str(exc)[:120]}")
            return float("inf")
        timings.append({"config": repr(config), "ms": ms})
        return ms

    default = sparse_moe_config(tokens, e, k)
    best = (time_config(default), default)
    for bm, gate_up_options, down_options in sweep_candidates(rows):
        gate_up = min(gate_up_options, key=lambda c: time_config(SparseMoEConfig(bm, c, down_options[0])))
        down = min(down_options, key=lambda c: time_config(SparseMoEConfig(bm, gate_up, c)))
        candidate = SparseMoEConfig(bm, gate_up, down)
        best = min(best, (time_config(candidate), candidate), key=lambda t: t[0])
    if rows > 64:  # tile order of the best tiles: gate|up's group first, then down's
        _, config = best
        for g in SWEEP_GROUP_M:
            grouped = replace(config, gate_up=replace(config.gate_up, group_m=g))
            best = min(best, (time_config(grouped), grouped), key=lambda t: t[0])
        _, config = best
        for g in SWEEP_GROUP_M:
            grouped = replace(config, down=replace(config.down, group_m=g))
            best = min(best, (time_config(grouped), grouped), key=lambda t: t[0])
    entry = {
        "tokens": tokens,
        "rows_per_expert": rows,
        "default": repr(default),
        "default_ms": timings[0]["ms"] if timings else float("inf"),
        "best": repr(best[1]),
        "best_ms": best[0],
        "all": timings,
    }
    return entry, best[1]


# --- report ---------------------------------------------------------------------------------------
def markdown(data) -> str:
    meta, hw = data.get("meta", {}), data.get("hardware", {})
    lines = ["# moetrt Triton MoE kernels: benchmark", ""]
    lines.append(
        f"{meta.get('gpu')} ({meta.get('sm_count')} SMs) | torch {meta.get('torch')} (CUDA {meta.get('torch_cuda')}) | "
        f"triton {meta.get('triton')} | transformers {meta.get('transformers')} | "
        f"moetrt {meta.get('moetrt_commit')} | {meta.get('started')}"
    )
    if hw:
        lines += [
            "",
            f"Measured: copy {hw['copy_bytes_per_s'] / 1e12:.3f} TB/s, "
            f"bf16 matmul {hw['bf16_matmul_flops_per_s'] / 1e12:.1f} TFLOP/s.",
        ]
    blocks = data.get("moe_block") or []
    if blocks:
        names = []
        for row in blocks:
            names += [n for n in row["times_ms"] if n not in names]
        lines += ["", "## One MoE block (Mixtral-8x7B sizes, bf16): median time in microseconds", ""]
        lines.append(
            "| T | experts hit | floor | " + " | ".join(names) + " | ours best / floor | transformers best / floor |"
        )
        lines.append("|---" * (len(names) + 5) + "|")
        for row in blocks:
            cells = [f"{row['times_ms'][n] * 1e3:.1f}" if n in row["times_ms"] else "-" for n in names]
            hf = f"{row['hf_best_x_floor']:.2f}" if row.get("hf_best_x_floor") else "-"
            ok = "" if row.get("meets_target") else " (over 1.3)"
            lines.append(
                f"| {row['tokens']} | {row['experts_hit']} | {row['floor_ms'] * 1e3:.1f} | " + " | ".join(cells)
                + f" | {row.get('ours_best_x_floor', float('nan')):.2f}{ok} | {hf} |"
            )  # fmt: skip
        enames = []
        for row in blocks:
            enames += [n for n in row["errors"] if n not in enames]
        lines += [
            "",
            "Relative Frobenius error against the fp32 computation "
            "(block: its own routing; experts: the reference routing)",
            "",
        ]
        lines.append("| T | routing rows equal | " + " | ".join(enames) + " |")
        lines.append("|---" * (len(enames) + 2) + "|")
        for row in blocks:
            cells = [f"{row['errors'][n]:.2e}" if n in row["errors"] else "-" for n in enames]
            lines.append(
                f"| {row['tokens']} | {row.get('routing_rows_equal_reference', float('nan')):.4f} | "
                + " | ".join(cells)
                + " |"
            )
        notes = {(n, v) for row in blocks for n, v in row["notes"].items()}
        if notes:
            lines += [""] + [f"- {n}: {v}" for n, v in sorted(notes)]
    fp8 = [row for row in blocks if "fp8_floor_ms" in row]
    if fp8:
        lines += ["", "## FP8 experts (e4m3, 128 x 128 weight blocks, per-token activation scales) against our bf16 block",
                  "", "| T | ours bf16 best (us) | ours fp8 block (us) | fp8 block graph (us) | fp8 / bf16 | target "
                  "| fp8 floor (us) | fp8 / fp8 floor | fp8 block error vs fp32 | bf16 block error vs fp32 |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in fp8:
            t, e = row["times_ms"], row["errors"]
            bf16_best = min(v for key, v in t.items() if key.startswith("ours block") and "fp8" not in key)
            us = lambda key: f"{t[key] * 1e3:.1f}" if key in t else "-"  # noqa: E731
            ratio = lambda key: f"{row[key]:.2f}" if row.get(key) is not None else "-"  # noqa: E731
            err = lambda key: f"{e[key]:.2e}" if key in e else "-"  # noqa: E731
            target = row.get("fp8_target_x_bf16")
            verdict = "-" if target is None else f"<= {target}" + ("" if row.get("fp8_meets_target") else " (missed)")
            lines.append(
                f"| {row['tokens']} | {bf16_best * 1e3:.1f} | {us('ours fp8 block')} | {us('ours fp8 block (graph)')} "
                f"| {ratio('fp8_best_x_bf16')} | {verdict} | {row['fp8_floor_ms'] * 1e3:.1f} "
                f"| {ratio('fp8_best_x_fp8_floor')} | {err('ours fp8 block')} | {err('ours block')} |"
            )
    e2e = data.get("e2e") or {}
    if e2e.get("fp8_decode_x_bf16") is not None:
        lines += ["", f"FP8 greedy decode: {e2e['fp8_decode_x_bf16']:.2f}x our bf16 decode (target >= "
                      f"{TARGET_FP8_DECODE}{'' if e2e.get('fp8_decode_meets_target') else ', missed'}); its floor "
                      f"{e2e['fp8_floor_tokens_per_s']:.0f} tokens/s."]
    if e2e.get("runs"):
        lines += ["", f"## Greedy decode, prompt {e2e['prompt']}, {e2e['new_tokens']} new tokens", ""]
        if "floor_tokens_per_s" in e2e:
            lines.append(
                f"Floor: {e2e['bytes_per_step'] / 1e9:.3f} GB read a step -> {e2e['floor_tokens_per_s']:.0f} tokens/s."
            )
            lines.append("")
        lines.append(
            "| implementation | prefill + 1 token (ms) | decode tokens/s | of floor "
            "| prefill logits error vs fp32 | leading tokens equal to fp32 |"
        )
        lines.append("|---|---|---|---|---|---|")
        errors = e2e.get("prefill_logits_error", {})
        for name, entry in e2e["runs"].items():
            of = f"{entry['decode_of_floor']:.1%}" if "decode_of_floor" in entry else "-"
            err = f"{errors[name]:.2e}" if name in errors else "-"
            lines.append(
                f"| {name} | {entry['prefill_plus_1_s'] * 1e3:.1f} | {entry['decode_tokens_per_s']:.1f} | {of} | "
                f"{err} | {entry.get('leading_tokens_equal_to_fp32', '-')} |"
            )
        lines += [""] + [f"- {n}: {v}" for n, v in e2e.get("notes", {}).items()]
    if data.get("tune"):
        lines += [
            "",
            "## Tuning (SparseMoE alone)",
            "",
            "| T | rows per expert | table config (ms) | best config (ms) |",
            "|---|---|---|---|",
        ]
        for entry in data["tune"]:
            table, best = f"{entry['default']} ({entry['default_ms']:.4f})", f"{entry['best']} ({entry['best_ms']:.4f})"
            lines.append(f"| {entry['tokens']} | {entry['rows_per_expert']:.1f} | {table} | {best} |")
    if data.get("failures"):
        lines += ["", "## Failures", ""] + [f"- {f['part']}: {f['error']}" for f in data["failures"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.smoke:
            print(
                "no CUDA device: this benchmark needs a GPU (use --smoke to check the script on a CPU)", file=sys.stderr
            )
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    dims = SMOKE if args.smoke else FULL
    run = Run(args.out)
    bench = make_bench(torch, cuda)
    run.part("versions", collect_meta, run, torch, cuda, args)
    run.data["meta"]["dims"] = dims
    hw = run.part("device", measure_hardware, run, torch, cuda, bench, args.smoke)
    if hw is None:
        return 1
    if args.tune:
        tuned = run.part("tune", tune, run, torch, cuda, bench, args, dims)
        if tuned:
            use_tuned(run, tuned)
    if not args.skip_block:
        run.part("moe block", moe_block, run, torch, cuda, bench, args, dims, hw)
    if not args.skip_e2e:
        run.part("greedy decode", e2e_decode, run, torch, cuda, args, dims, hw)
    run.data["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    run.save()
    print("\n" + markdown(run.data))
    print(f"results: {args.out / 'bench_kernels_h200.json'} and .md")
    return 1 if run.data["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
