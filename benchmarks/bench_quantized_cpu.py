"""Quantized bench-small on ONNX Runtime CPU: prefill against the fp32 canonical export, decode against
its own bytes floor, and the per-op profiles that say where each one's time goes.

Every variant is ``moetrt optimize --target ort-cpu`` of one canonical bench-small export (random
weights seeded 0: d 1024, 4 layers, 8 experts of ffn 3584, top-2, vocab 32000), run by moetrt's
runtime (``Session(folder, backend="ort")``). One round runs every variant once (a 1 x ``--prompt``
prefill, then ``--decode-tokens`` greedy steps), the order rotating round by round, and then the
read rate of a large fp32 MatMul ([1, 4096] x [4096, 16384], ``bench_runtime_cpu.MatMulReadRate``).

- prefill vs canonical: median over rounds of canonical's prefill time over the variant's, both
  from the same round (above 1: the variant is faster).
- decode vs its floor: a batch-1 decode step must read the bytes of every weight it uses once
  (``bench_ort_optimize.decode_bytes_per_token``: the variant's own quantized weights and scales,
  K/E of the experts, one embedding row, the KV cache at the middle of decode); the floor is those
  bytes at the read rate measured right after the same round. Median over rounds of tok/s over
  the floor.
- profiles: ONNX Runtime's own (``enable_profiling``), one session per variant after the timed
  rounds; kernel time per op type of one prefill (the second of two) and of the decode steps that
  follow it (mean per step), and the share of the largest ops.

    python benchmarks/bench_quantized_cpu.py [--repeat 6] [--work DIR] [--out benchmarks/results]

Writes ``quantized_cpu.json`` and ``quantized_cpu.md``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ort_optimize as ort_bench  # noqa: E402 (variants, optimize and the decode bytes, shared)
import bench_runtime_cpu as peer_bench  # noqa: E402 (build, runs, read rate, machine and versions)

VARIANTS = {
    "canonical": None,
    "int8 experts": dict(quantize_experts="int8"),
    "int4 experts": dict(quantize_experts="int4"),
    "int8 experts + int8 weights": dict(quantize_experts="int8", quantize_weights="int8"),
    "int4 experts + int8 weights": dict(quantize_experts="int4", quantize_weights="int8"),
    "int4 experts + int4 weights": dict(quantize_experts="int4", quantize_weights="int4"),
    "int4 experts + int8 weights, blocks of 128": dict(quantize_experts="int4", quantize_weights="int8",
                                                       block_size=128),
    "int4 experts + int8 weights + last logits": dict(quantize_experts="int4", quantize_weights="int8",
                                                      last_logits=True),
}
DECODE_FLOOR_TARGET = 0.8  # int4 experts + int8 weights: decode at least this share of its bytes floor
PROFILE_STEPS = 8  # decode steps profiled after the prefill


def profile(folder: Path, prompt: list[int], threads: int, prefix: str) -> dict:
    """Kernel ms per op type: one prefill (the second of two) and the mean of the decode steps after it."""
    import onnxruntime as ort

    options = peer_bench.ort_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = prefix
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    ids = np.array([prompt], np.int64)
    prefill = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(len(prompt))[None]}
    prefill.update({i.name: np.zeros([1, i.shape[1], 0, i.shape[3]], np.float32) for i in pasts})
    for _ in range(2):
        values = dict(zip(names, session.run(names, prefill)))
    for step in range(PROFILE_STEPS):
        total = len(prompt) + step + 1
        feeds = {"input_ids": values["logits"][:, -1].argmax(-1)[:, None], "attention_mask": np.ones((1, total), np.int64),
                 "position_ids": np.array([[total - 1]])}
        feeds.update({i.name: values[i.name.replace("past_key_values.", "present.")] for i in pasts})
        values = dict(zip(names, session.run(names, feeds)))
    path = Path(session.end_profiling())
    events = json.loads(path.read_text())
    path.unlink()
    runs = sorted((e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"), key=lambda e: e["ts"])
    spans = [(r["ts"], r["ts"] + r["dur"]) for r in runs]
    prefill_ops, decode_ops = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        index = next((i for i, (a, b) in enumerate(spans) if a <= e["ts"] <= b), None)
        if index == 1:
            prefill_ops[e["args"]["op_name"]] += e["dur"] / 1e3
        elif index is not None and index >= 2:
            decode_ops[e["args"]["op_name"]] += e["dur"] / 1e3 / PROFILE_STEPS
    return {"prefill_ms": dict(prefill_ops.most_common()), "decode_ms": dict(decode_ops.most_common()),
            "prefill_run_ms": spans[1][1] / 1e3 - spans[1][0] / 1e3 if len(spans) > 1 else None}


def measure(folders: dict[str, Path], prompt: list[int], steps: int, repeat: int, threads: int, work: Path) -> dict:
    runs = {name: peer_bench.moetrt_run(folder, prompt, steps, backend="ort",
                                        session_options=peer_bench.ort_options(threads))
            for name, folder in folders.items()}
    tokens = {name: run()[3] for name, run in runs.items()}  # warm-up
    matmul = peer_bench.MatMulReadRate(threads)
    prefill = {name: [] for name in runs}
    decode = {name: [] for name in runs}
    read_rate, loads = [], []
    order = list(runs)
    for round_ in range(repeat):
        for name in order[round_ % len(order):] + order[: round_ % len(order)]:
            seconds, decode_seconds, steps_run, _ = runs[name]()
            prefill[name].append(seconds * 1e3)
            decode[name].append(steps_run / decode_seconds)
        read_rate.append(matmul.measure()["gb_per_s"])
        loads.append(os.getloadavg()[0])
        peer_bench.log(f"round {round_ + 1}: read {read_rate[-1]:.1f} GB/s; " + ", ".join(
            f"{name} {prefill[name][-1]:.0f} ms / {decode[name][-1]:.0f} tok/s" for name in order))
    del runs, matmul
    profiles = {name: profile(folder, prompt, threads, str(work / "profile")) for name, folder in folders.items()}
    return {"prefill_ms": prefill, "decode_tok_s": decode, "read_gb_s": read_rate, "tokens": tokens,
            "load_after_round": loads, "profiles": profiles, "peak_rss_gb": peer_bench.peak_rss_gb()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=6, help="rounds after the warm-up")
    parser.add_argument("--prompt", type=int, default=256, help="prefill tokens (batch 1)")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--work", type=Path, default=None, help="keep the exported/optimized folders here (reused)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    import moetrt

    started, load_before = time.perf_counter(), os.getloadavg()
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory()
        args.work = Path(tmp.name)
    args.work.mkdir(parents=True, exist_ok=True)
    cfg = moetrt.MoEConfig.from_name(peer_bench.PRESET)
    peer_bench.in_subprocess(peer_bench.build_moetrt, args.work, args.threads)
    src = args.work / "canonical"
    folders = {name: ort_bench.optimized(src, args.work, name, options) for name, options in VARIANTS.items()}
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, args.prompt).tolist()
    measured = peer_bench.in_subprocess(measure, folders, prompt, args.decode_tokens, args.repeat, args.threads,
                                        args.work)
    context = args.prompt + args.decode_tokens // 2
    canonical = measured["prefill_ms"]["canonical"]
    rows = []
    for name, folder in folders.items():
        prefill, decode = measured["prefill_ms"][name], measured["decode_tok_s"][name]
        nbytes = ort_bench.decode_bytes_per_token(folder, context)
        floor = [rate * 1e9 / nbytes for rate in measured["read_gb_s"]]  # tok/s the bytes allow, round by round
        rows.append({
            "variant": name, "prefill_ms": statistics.median(prefill), "decode_tok_s": statistics.median(decode),
            "prefill_vs_canonical": statistics.median(c / p for c, p in zip(canonical, prefill)),
            "decode_bytes_per_token": nbytes, "floor_tok_s": statistics.median(floor),
            "decode_vs_floor": statistics.median(d / f for d, f in zip(decode, floor)),
            "prefill_ms_runs": prefill, "decode_tok_s_runs": decode, "profile": measured["profiles"][name],
        })
    result = {
        "benchmark": "bench-small quantized on ONNX Runtime CPU: prefill vs the fp32 canonical, decode vs its bytes floor",
        "command": " ".join(["python benchmarks/bench_quantized_cpu.py",
                             *peer_bench.named_work(sys.argv[1:] if argv is None else argv)]),
        "workload": {"batch": 1, "prompt": args.prompt, "decode_tokens": args.decode_tokens, "repeat": args.repeat,
                     "threads": args.threads},
        "machine": peer_bench.machine_info(args.threads), "versions": peer_bench.versions(),
        "load_average": {"before": load_before, "after": os.getloadavg(),
                         "after_each_round": measured["load_after_round"]},
        "read_gb_s": measured["read_gb_s"], "wall_seconds": time.perf_counter() - started,
        "peak_rss_gb": measured["peak_rss_gb"], "rows": rows, "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantized_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    write_report(args.out / "quantized_cpu.md", result)
    if tmp is not None:
        tmp.cleanup()
    print((args.out / "quantized_cpu.md").read_text())
    return 0


def _top(ops: dict[str, float], count: int = 4) -> str:
    total = sum(ops.values()) or 1.0
    return ", ".join(f"{op} {ms:.1f} ({100 * ms / total:.0f}%)" for op, ms in list(ops.items())[:count])


def write_report(path: Path, result: dict) -> None:
    m, v, w, loads = result["machine"], result["versions"], result["workload"], result["load_average"]
    rounds = loads["after_each_round"]
    lines = [
        "# Quantized bench-small on ONNX Runtime CPU: prefill against fp32, decode against its bytes floor",
        "",
        (f"{result['date']}. {m['cpu']}, 2 shared cores under load, {w['threads']} threads, {m['memory']}, "
         f"{m['platform']}. Python {v['python']}, onnxruntime {v['onnxruntime']}, torch {v['torch']}, "
         f"moetrt {v['moetrt']} ({v['moetrt_commit']})."),
        (f"bench-small (random weights), batch 1: prefill of {w['prompt']} tokens, then {w['decode_tokens']} greedy "
         f"decode steps, through `Session(folder, backend=\"ort\")`; every variant loaded together, one warm-up, then "
         f"{w['repeat']} rounds in a rotating order, each followed by the read rate of an fp32 MatMul. Command: "
         f"`{result['command']}` ({result['wall_seconds'] / 60:.1f} min, peak memory {result['peak_rss_gb']:.1f} GB). "
         f"Load average (1/5/15 min): {' / '.join(f'{x:.2f}' for x in loads['before'])} before, "
         f"{' / '.join(f'{x:.2f}' for x in loads['after'])} after; 1-min after each round "
         f"{min(rounds):.2f}-{max(rounds):.2f}. Read rate over rounds: "
         f"{min(result['read_gb_s']):.1f}-{max(result['read_gb_s']):.1f} GB/s (median "
         f"{statistics.median(result['read_gb_s']):.1f})."),
        "",
        ("| variant | prefill 1x256 ms | prefill vs canonical | decode tok/s | bytes per decode token | floor tok/s "
         "| decode vs its floor |"),
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['variant']} | {row['prefill_ms']:.0f} | {row['prefill_vs_canonical']:.2f}x | "
                     f"{row['decode_tok_s']:.1f} | {row['decode_bytes_per_token'] / 1e6:.0f} MB | "
                     f"{row['floor_tok_s']:.1f} | {row['decode_vs_floor']:.0%} |")
    lines += ["", ("*prefill vs canonical*: median over rounds of canonical's prefill time over the variant's in the "
                   "same round (above 1: faster). *floor*: the bytes one decode step reads at the MatMul read rate "
                   "measured after the same round; *decode vs its floor*: median over rounds of tok/s over that floor."),
              "", "**Targets**:", ""]
    quantized = [row for row in result["rows"] if row["variant"] != "canonical"]
    slowest = min(quantized, key=lambda row: row["prefill_vs_canonical"])
    lines.append(f"- every quantized variant's prefill >= the fp32 canonical's in the same run: slowest "
                 f"{slowest['variant']} {slowest['prefill_vs_canonical']:.2f}x "
                 f"({'met' if slowest['prefill_vs_canonical'] >= 1.0 else 'not met'}).")
    target = next((row for row in result["rows"] if row["variant"] == "int4 experts + int8 weights"), None)
    if target is not None:
        lines.append(f"- int4 experts + int8 weights decode >= {DECODE_FLOOR_TARGET:.0%} of its bytes floor: "
                     f"{target['decode_vs_floor']:.0%} "
                     f"({'met' if target['decode_vs_floor'] >= DECODE_FLOOR_TARGET else 'not met'}).")
    lines += ["", "## Where the time goes (ONNX Runtime's profile: kernel ms per op type)", "",
              "| variant | prefill 1x256: kernel ms | largest ops (ms, share) | decode step: kernel ms | largest ops (ms, share) |",
              "|---|---|---|---|---|"]
    for row in result["rows"]:
        p = row["profile"]
        lines.append(f"| {row['variant']} | {sum(p['prefill_ms'].values()):.0f} | {_top(p['prefill_ms'])} | "
                     f"{sum(p['decode_ms'].values()):.1f} | {_top(p['decode_ms'])} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
