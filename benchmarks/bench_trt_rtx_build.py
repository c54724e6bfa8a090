"""TensorRT for RTX builds on the CPU: build time, engine size and layer summary per export.

    python benchmarks/bench_trt_rtx_build.py                       # tiny + every family, fp32 and fp16 exports
    python benchmarks/bench_trt_rtx_build.py --variants tiny --out benchmarks/results/trt_rtx_build

Each variant is exported (fp32 and fp16), then built with ``optimize --target trt-rtx`` for one
compute capability (8.6) and for the default set, with a small profile (the tests' one). Build
times are medians of ``--repeat`` builds; the parse-to-engine time is what ``moetrt.json``
records (``engine.build_seconds``). No GPU is used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROFILE = "batch=1:1:2,seq=1:4:8,past=0:4:8"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", default=None, help="tiny and/or tests/hf_tiny.py variants")
    parser.add_argument("--dtypes", nargs="*", default=["fp32", "fp16"])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--all-capabilities", action="store_true", help="also build for the default capability set")
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    parser.add_argument("--note", default="", help="a line about the machine (e.g. its load)")
    args = parser.parse_args()

    import moetrt
    from moetrt.export import onnx_from_torch
    from moetrt.optimize import optimize
    from tests.hf_tiny import FAMILIES, FAMILY_OF, hf_tiny_model

    variants = args.variants or ["tiny", *(next(v for v, f in FAMILY_OF.items() if f == fam) for fam in FAMILIES)]
    capability_sets = [["8.6"]] + ([None] if args.all_capabilities else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = moetrt.from_pretrained("tiny" if variant == "tiny" else hf_tiny_model(variant))
            for dtype in args.dtypes:
                exported = Path(tmp) / f"{variant}-{dtype}"
                started = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    onnx_from_torch(model, exported, dtype=dtype, progress=False)
                export_s = time.perf_counter() - started
                for caps in capability_sets:
                    builds, totals = [], []
                    for _ in range(args.repeat):
                        out = Path(tmp) / "engine"
                        shutil.rmtree(out, ignore_errors=True)
                        started = time.perf_counter()
                        optimize(exported, out, "trt-rtx", profile=PROFILE, progress=False,
                                 **({"compute_capabilities": caps} if caps else {}))
                        totals.append(time.perf_counter() - started)
                        meta = json.loads((out / "moetrt.json").read_text())
                        builds.append(meta["engine"]["build_seconds"])
                    layers = json.loads((out / "layers.json").read_text())
                    rows.append({
                        "variant": variant, "dtype": dtype, "capabilities": meta["engine"]["compute_capabilities"],
                        "export_s": round(export_s, 1), "build_s": round(statistics.median(builds), 2),
                        "optimize_s": round(statistics.median(totals), 2), "engine_mb": round(meta["engine"]["bytes"] / 1e6, 2),
                        "onnx_mb": round((exported / "model.onnx").stat().st_size / 1e6, 2),
                        "layers": layers["num_layers"], "matmuls": layers["layer_types"].get("MATRIX_MULTIPLY", 0),
                        "layer_types": layers["layer_types"],
                    })
                    print(json.dumps(rows[-1]), flush=True)
    import tensorrt_rtx

    header = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU", "note": args.note,
              "tensorrt_rtx": tensorrt_rtx.__version__, "python": platform.python_version(), "profile": PROFILE,
              "repeat": args.repeat}
    if args.out:
        Path(args.out + ".json").write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
        lines = [f"# TensorRT for RTX builds on the CPU", "", *(f"- {k}: {v}" for k, v in header.items()), "",
                 "| export | compute capabilities | export s | build s (median) | optimize s | ONNX MB | engine MB "
                 "| network layers | matmuls |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['variant']} {r['dtype']} | {', '.join(r['capabilities'])} | {r['export_s']} | "
                         f"{r['build_s']} | {r['optimize_s']} | {r['onnx_mb']} | {r['engine_mb']} | {r['layers']} | "
                         f"{r['matmuls']} |")
        first = rows[0]
        lines += ["", f"Layer types of {first['variant']} {first['dtype']} (network as the builder received it): "
                  + ", ".join(f"{k} {v}" for k, v in first["layer_types"].items())]
        Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
