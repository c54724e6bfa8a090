"""Is the exported SparseMoE function body really sparse?

One MoE layer (router + moetrt::TopKRouting + moetrt::SparseMoE, d 256, ffn 512, top-2) is
exported through the same path as full models and run by plain ONNX Runtime (CPU EP, no
library of ours). 64 experts against 2 experts is equal active compute (k = 2 experts per
token either way), so a perfectly sparse body gives a ratio of 1.0 and a dense body ~E/k = 32.

    python benchmarks/bench_sparsity.py [--repeat 50] [--out benchmarks/results]

Writes ``sparsity.json`` and ``sparsity.md`` (machine, versions, medians, ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def export_moe_layer(num_experts: int, dim: int, ffn: int, k: int, path: Path) -> None:
    from moetrt.export import onnx_moe_layer

    onnx_moe_layer(path, num_experts, dim, ffn, k, std=0.05)


def environment(threads: int) -> dict:
    """The machine and package versions a layer benchmark records beside its numbers."""
    from moetrt.artifact import package_versions

    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "threads": threads},
        "versions": package_versions("moetrt", "torch", "onnx", "onnxruntime"),
    }


def time_session(path: Path, tokens: int, dim: int, repeat: int, threads: int) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((tokens, dim)).astype(np.float32)
    for _ in range(5):
        session.run(None, {"x": x})
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for experts in (64, 2):
            paths[experts] = Path(tmp) / f"moe_e{experts}.onnx"
            export_moe_layer(experts, args.dim, args.ffn, 2, paths[experts])
        for tokens in (512, 1):
            ms = {e: time_session(paths[e], tokens, args.dim, args.repeat, args.threads) for e in (64, 2)}
            rows.append({"tokens": tokens, "ms_64_experts": ms[64], "ms_2_experts": ms[2], "ratio": ms[64] / ms[2]})
            print(f"T={tokens:4d}: 64 experts {ms[64]:.3f} ms, 2 experts {ms[2]:.3f} ms, ratio {ms[64] / ms[2]:.2f}x")

    result = {
        "benchmark": "sparsity of the exported SparseMoE function body (one MoE layer, ONNX Runtime CPU)",
        "shape": {"dim": args.dim, "ffn": args.ffn, "k": 2},
        **environment(args.threads),
        "repeat": args.repeat,
        "rows": rows,
        "targets": {"ratio_T512": 2.5, "ratio_T1": 1.5},
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sparsity.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Sparsity of the exported SparseMoE body",
        "",
        f"One MoE layer, d {args.dim}, ffn {args.ffn}, top-2, ONNX Runtime {ort.__version__} CPU EP, "
        f"{args.threads} threads, {result['machine']['processor']} ({os.cpu_count()} cores), "
        f"median of {args.repeat} runs, {result['date']}.",
        "64 vs 2 experts is equal active compute: a sparse body gives ~1x, a dense one ~32x.",
        "",
        "| T | 64 experts (ms) | 2 experts (ms) | ratio | target |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        target = result["targets"]["ratio_T512" if row["tokens"] == 512 else "ratio_T1"]
        lines.append(f"| {row['tokens']} | {row['ms_64_experts']:.3f} | {row['ms_2_experts']:.3f} | "
                     f"{row['ratio']:.2f}x | <= {target}x |")
    (args.out / "sparsity.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
