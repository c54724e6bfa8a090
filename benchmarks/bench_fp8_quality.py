#!/usr/bin/env python3
"""Quality of FP8 e4m3 experts on a trained model: held-out perplexity of the ``tiny`` preset.

The issue's quality target for FP8 experts is held-out perplexity within 1% of bf16 on a trained
small model. This runs on a CPU: ``FP8Experts`` there computes with ``sparse_moe_fp8_torch``, the
same e4m3 bytes, scales and roundings as the Triton kernels (quantized activations, float32
products, h rounded to the model dtype and quantized again), summed in another order; the kernels
themselves are checked against it in the tests. Rows: the model in fp32 and bf16, and bf16 with
its routed experts in FP8 for each scale layout (weights in 128 x 128 blocks or per output
channel; activations per token or per 128 columns).

    python benchmarks/bench_fp8_quality.py [--out benchmarks/results] [--seq 128]

Writes ``fp8_quality.json`` and ``fp8_quality.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def heldout_ids() -> list[int]:
    from tokenizers import Tokenizer

    from moetrt.checkpoint import PRESET_DIR

    preset = PRESET_DIR / "tiny"
    return Tokenizer.from_file(str(preset / "tokenizer.json")).encode((preset / "heldout.txt").read_text()).ids


def perplexity(torch, model, ids: list[int], seq: int, batch: int) -> tuple[float, int]:
    """exp(mean next-token NLL) over non-overlapping windows of ``seq`` tokens; (ppl, tokens scored)."""
    windows = [ids[i : i + seq] for i in range(0, len(ids) - seq + 1, seq)]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), batch):
            chunk = torch.tensor(windows[start : start + batch])  # [B, S]
            logits = model(chunk).logits.float()  # [B, S, V]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                    chunk[:, 1:].reshape(-1), reduction="sum")
            total, count = total + float(nll), count + chunk[:, 1:].numel()
    return math.exp(total / count), count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    import torch

    import moetrt
    from moetrt.fp8 import fp8_experts

    torch.manual_seed(0)
    ids = heldout_ids()
    rows = []

    def measure(name, model, note=""):
        started = time.perf_counter()
        ppl, scored = perplexity(torch, model, ids, args.seq, args.batch)
        rows.append({"model": name, "perplexity": ppl, "tokens": scored, "seconds": time.perf_counter() - started,
                     "note": note})
        print(f"{name:52s} ppl {ppl:8.4f}  ({scored} tokens)", flush=True)

    measure("fp32", moetrt.from_pretrained("tiny"))
    measure("bf16", moetrt.from_pretrained("tiny", dtype=torch.bfloat16))
    for weight_scales, activation_scales in (("block", "token"), ("block", "block"), ("channel", "token")):
        model = moetrt.from_pretrained("tiny", dtype=torch.bfloat16)
        fp8_experts(model, weight_scales, activation_scales)
        measure(f"bf16, FP8 experts ({weight_scales} weight scales, {activation_scales} activation scales)", model,
                "128 x 128 weight blocks" if weight_scales == "block" else "one scale per output row")
    bf16 = next(r["perplexity"] for r in rows if r["model"] == "bf16")
    fp32 = next(r["perplexity"] for r in rows if r["model"] == "fp32")
    for row in rows:
        row["x_bf16"], row["x_fp32"] = row["perplexity"] / bf16, row["perplexity"] / fp32
    meta = {"machine": f"{platform.machine()} CPU, 2 shared cores under load", "python": platform.python_version(),
            "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "seq": args.seq,
            "target": "FP8 experts' held-out perplexity within 1% of bf16 (ratio <= 1.01)"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fp8_quality.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["# FP8 experts: held-out perplexity of the trained `tiny` preset", "",
             f"{meta['machine']} | Python {meta['python']} | torch {meta['torch']} | {meta['started']} | "
             f"{rows[0]['tokens']} held-out tokens in windows of {args.seq}", "",
             "FP8 experts computed by `sparse_moe_fp8_torch` (the kernels' arithmetic, summed in another order). "
             "Target: within 1% of bf16.", "",
             "| model | perplexity | / bf16 | / fp32 |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['perplexity']:.4f} | {r['x_bf16']:.4f} | {r['x_fp32']:.4f} |" for r in rows]
    (args.out / "fp8_quality.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
