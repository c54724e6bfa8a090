"""Quantization quality of a trained DeepSeek-style model, measured as ``bench_ort_optimize`` measures tiny's.

The model is the one ``scripts/train_deepseek_tiny.py`` trains (sigmoid routing with a selection
bias and groups, a routed scaling factor, a shared expert, latent attention) on tiny's corpus and
tokenizer. Its MoE layers go through the log-weights path of the ORT lowering (the TopKRouting
node stays and routes; com.microsoft::MoE / QMoE run the experts). Held-out perplexity, logits
error and top-1 agreement against its fp32 export on tiny's heldout.txt
(``bench_ort_optimize.heldout_quality``).

    python scripts/train_deepseek_tiny.py --out /tmp/deepseek-tiny
    python benchmarks/bench_deepseek_quality.py /tmp/deepseek-tiny --json benchmarks/results/deepseek_quality.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "scripts")]

import bench_ort_optimize  # noqa: E402
import train_deepseek_tiny  # noqa: E402

ROWS = {
    "fp32, every layer com.microsoft::MoE": dict(moe_lowering="always"),
    "int8 experts": dict(quantize_experts="int8"),
    "int4 experts": dict(quantize_experts="int4"),
    "int4 experts + int8 weights": dict(quantize_experts="int4", quantize_weights="int8"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="the folder scripts/train_deepseek_tiny.py wrote")
    parser.add_argument("--work", type=Path, default=None, help="where exports go (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here too")
    args = parser.parse_args(argv)
    import onnxruntime
    import torch

    work = args.work or Path(tempfile.mkdtemp(prefix="deepseek-quality-"))
    model = train_deepseek_tiny.load(args.model)
    quality = bench_ort_optimize.heldout_quality(model, work, "deepseek-tiny", ROWS)
    quality["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                           "onnxruntime": onnxruntime.__version__}
    quality["machine"] = f"{platform.machine()}, {platform.processor() or 'unknown CPU'}"
    rows = quality["rows"]
    print("| model | perplexity | vs fp32 | logits max abs error | logits mean abs error | top-1 agreement |")
    print("|---|---|---|---|---|---|")
    print(f"| fp32 export (canonical) | {rows['fp32']['perplexity']:.4f} | 1 | 0 | 0 | 100% |")
    for name, q in rows.items():
        if name != "fp32":
            print(f"| {name} | {q['perplexity']:.4f} | {q['perplexity_ratio']:.5f} | {q['logits_max_abs']:.4g} | "
                  f"{q['logits_mean_abs']:.4g} | {q['top1_agreement']:.2%} |")
    if args.json:
        args.json.write_text(json.dumps(quality, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
