"""What `moetrt optimize --target ort-cpu` buys on ONNX Runtime CPU: bench-small, prefill and decode.

The ``bench-small`` preset (random weights: d 1024, 4 layers, 8 experts of ffn 3584, top-2, vocab
32000) is exported once, optimized into each variant below, and run by moetrt's own runtime
(``Session(folder, backend="ort")``, IO binding, KV cache as OrtValues): one 1x256 prompt, then
greedy decode. Each variant reports the prefill time, decode tokens/s (medians over the repeats)
and the bytes of weights one decode step must read at batch 1 (every non-expert weight, one
embedding row, K/E of the expert weights, the KV cache of the context).

    canonical      the export: moetrt::TopKRouting + moetrt::SparseMoE function bodies
    fp32 auto      optimize default: com.microsoft::MoE for decode steps, the body for prefill
    fp32 always    com.microsoft::MoE at every step
    int8 experts   --quantize-experts int8 (com.microsoft::QMoE, blocks of 32, int8 activations)
    int4 experts   --quantize-experts int4 (int8 activations inside the expert GEMMs, the default)
    int4 experts, fp32 act.   --quantize-experts int4 --expert-activations fp32

The quality cost of int8/int4 experts is measured on the trained ``tiny`` preset (held-out
perplexity and logits against its fp32 export), since bench-small's weights are random.

    python benchmarks/bench_ort_optimize.py [--repeat 3] [--decode-tokens 32] [--work DIR] [--out benchmarks/results]

Writes ``ort_optimize.json`` and ``ort_optimize.md``. The transformers-exporter ORT peer of
issue 6 is not run here (see the runtime benchmark).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

VARIANTS = {
    "canonical": None,
    "fp32 auto": dict(),
    "fp32 always": dict(moe_lowering="always"),
    "int8 experts": dict(quantize_experts="int8"),
    "int4 experts": dict(quantize_experts="int4"),
    "int4 experts, fp32 act.": dict(quantize_experts="int4", expert_activations="fp32"),
}


def export(model, folder: Path) -> None:
    from moetrt.export import onnx_from_torch

    if (folder / "moetrt.json").exists():
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_from_torch(model, folder, progress=True)


def optimized(src: Path, work: Path, name: str, options: dict | None) -> Path:
    from moetrt.optimize import optimize

    if options is None:
        return src
    out = work / "".join(c if c.isalnum() or c in "-_" else "-" for c in name)
    if not (out / "moetrt.json").exists():
        optimize(src, out, "ort-cpu", progress=True, **options)
    return out


def decode_bytes_per_token(folder: Path, context: int) -> int:
    """Bytes of weights (and KV cache) one batch-1 decode step reads, from the folder's graph."""
    import onnx_ir as ir

    model = ir.load(folder / "model.onnx")
    meta = json.loads((folder / "moetrt.json").read_text())["config"]
    k, experts = meta["num_experts_per_tok"], meta["num_experts"]
    expert_inputs: set[str] = set()
    gathered: set[str] = set()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type in ("SparseMoE", "MoE", "QMoE"):
            first = 3 if node.op_type == "SparseMoE" else 2
            expert_inputs |= {v.name for v in node.inputs[first:] if v is not None and v.is_initializer()}
        if node.op_type == "Gather" and node.inputs[0] is not None and node.inputs[0].is_initializer():
            gathered.add(node.inputs[0].name)
    total = 0.0
    for name, value in model.graph.initializers.items():
        if value.const_value is None:
            continue
        nbytes = value.const_value.nbytes
        if name in expert_inputs:
            total += nbytes * k / experts
        elif name in gathered:  # the embedding table: one row per token
            total += nbytes / value.const_value.shape[0]
        else:
            total += nbytes
    kv_elem = {"fp32": 4, "fp16": 2, "bf16": 2}[json.loads((folder / "moetrt.json").read_text())["export"]["dtype"]]
    total += 2 * meta["num_hidden_layers"] * meta["num_key_value_heads"] * meta["head_dim"] * context * kv_elem
    return int(total)


def run_variants(folders: dict[str, Path], vocab: int, prompt_len: int, decode_tokens: int, repeat: int) -> dict:
    """Prefill ms and decode tok/s per variant (medians). All sessions stay loaded and the rounds
    interleave the variants, so a change in the load of a shared machine hits them alike."""
    from moetrt.runtime import Session

    sessions, load_s = {}, {}
    rng = np.random.default_rng(0)
    for name, folder in folders.items():
        start = time.perf_counter()
        sessions[name] = Session(folder, backend="ort")
        load_s[name] = time.perf_counter() - start
        sessions[name].generate([rng.integers(3, vocab, 8).tolist()], max_new_tokens=4, stop_tokens=())  # warm up
    prefill: dict[str, list[float]] = {name: [] for name in folders}
    decode: dict[str, list[float]] = {name: [] for name in folders}
    for round_ in range(repeat):
        prompt = rng.integers(3, vocab, prompt_len).tolist()
        for name, session in sessions.items():
            result = session.generate([prompt], max_new_tokens=decode_tokens, stop_tokens=())
            prefill[name].append(result.prefill_seconds * 1e3)
            decode[name].append(result.decode_tokens_per_second)
            print(f"  round {round_ + 1} {name}: prefill {prefill[name][-1]:.0f} ms, decode {decode[name][-1]:.2f} tok/s",
                  flush=True)
    return {name: {"load_s": load_s[name], "prefill_ms": statistics.median(prefill[name]),
                   "decode_tok_s": statistics.median(decode[name]), "prefill_ms_runs": prefill[name],
                   "decode_tok_s_runs": decode[name]} for name in folders}


def tiny_quality(work: Path) -> dict:
    """Held-out perplexity and logits error of the trained tiny model: fp32 vs int8 vs int4 experts."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    import moetrt

    src = work / "quality-tiny-canonical"
    export(moetrt.from_pretrained("tiny"), src)
    preset = Path(moetrt.__file__).parent / "presets" / "tiny"
    ids = Tokenizer.from_file(str(preset / "tokenizer.json")).encode((preset / "heldout.txt").read_text()).ids
    seq = 128
    starts = [b for b in range(0, len(ids) - 1, seq) if b + seq + 1 <= len(ids)]

    def evaluate(folder: Path):
        sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        nats, count, logits_all = 0.0, 0, []
        for i in range(0, len(starts), 16):
            window = np.array([ids[b : b + seq + 1] for b in starts[i : i + 16]], np.int64)
            x, y = window[:, :-1], window[:, 1:]
            feeds = {"input_ids": x, "attention_mask": np.ones_like(x), "position_ids": np.tile(np.arange(seq), (len(x), 1))}
            for inp in sess.get_inputs():
                if inp.name.startswith("past_key_values"):
                    feeds[inp.name] = np.zeros((len(x), inp.shape[1], 0, inp.shape[3]), np.float32)
            logits = sess.run(["logits"], feeds)[0].astype(np.float64)
            top = logits.max(-1, keepdims=True)
            nats += float((np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
                           - np.take_along_axis(logits, y[..., None], -1)[..., 0]).sum())
            count += y.size
            logits_all.append(logits.astype(np.float32))
        return math.exp(nats / count), np.concatenate(logits_all), count

    ppl32, logits32, count = evaluate(src)
    rows = {"fp32": {"perplexity": ppl32}}
    for scheme in ("int8", "int4"):
        folder = optimized(src, work, f"quality-tiny-{scheme}", dict(quantize_experts=scheme))
        ppl, logits, _ = evaluate(folder)
        error = np.abs(logits - logits32)
        rows[scheme] = {"perplexity": ppl, "perplexity_ratio": ppl / ppl32, "logits_max_abs": float(error.max()),
                        "logits_mean_abs": float(error.mean()), "top1_agreement": float((logits.argmax(-1) == logits32.argmax(-1)).mean())}
    return {"tokens": count, "windows": f"{len(starts)} x {seq} tokens", "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench-small", help="model config (random weights); default: %(default)s")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=256, help="prefill tokens (batch 1)")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--work", type=Path, default=None, help="keep the exported/optimized folders here (reused)")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    import onnxruntime as ort
    import torch

    import moetrt

    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory()
        args.work = Path(tmp.name)
    args.work.mkdir(parents=True, exist_ok=True)
    cfg = moetrt.MoEConfig.from_name(args.preset)
    src = args.work / f"{args.preset}-canonical"
    if not (src / "moetrt.json").exists():
        export(moetrt.MoETransformer.from_config(cfg), src)
    folders = {name: optimized(src, args.work, f"{args.preset}-{name}", VARIANTS[name]) for name in args.variants}
    timings = run_variants(folders, cfg.vocab_size, args.prompt, args.decode_tokens, args.repeat)
    rows = []
    for name, folder in folders.items():
        row = {"variant": name, **timings[name]}
        row["decode_bytes_per_token"] = decode_bytes_per_token(folder, args.prompt + args.decode_tokens // 2)
        row["file_bytes"] = sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))
        rows.append(row)
        print(f"{name}: prefill {row['prefill_ms']:.0f} ms, decode {row['decode_tok_s']:.2f} tok/s, "
              f"{row['decode_bytes_per_token'] / 1e6:.0f} MB/token", flush=True)
    base = next((r for r in rows if r["variant"] == "canonical"), rows[0])
    for row in rows:
        row["prefill_speedup"] = base["prefill_ms"] / row["prefill_ms"]
        row["decode_speedup"] = row["decode_tok_s"] / base["decode_tok_s"]
    quality = None if args.skip_quality else tiny_quality(args.work)

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    result = {
        "benchmark": "bench-small on ONNX Runtime CPU: canonical export vs moetrt optimize variants",
        "config": {k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers", "num_experts", "num_experts_per_tok",
                                                "intermediate_size", "vocab_size")},
        "workload": {"batch": 1, "prompt": args.prompt, "decode_tokens": args.decode_tokens, "repeat": args.repeat},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "memory_gb": round(mem / 2**30, 1) if mem else None,
                    "load_average_at_end": os.getloadavg()},
        "versions": {"python": sys.version.split()[0], "onnxruntime": ort.__version__, "torch": torch.__version__,
                     "moetrt": moetrt.__version__},
        "rows": rows,
        "tiny_quality": quality,
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ort_optimize.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = [
        "# moetrt optimize --target ort-cpu: bench-small on ONNX Runtime CPU",
        "",
        f"bench-small (d 1024, 4 layers, 8 experts x ffn 3584, top-2, vocab 32000, random weights), batch 1: "
        f"prefill of {args.prompt} tokens, then {args.decode_tokens} greedy decode steps, through moetrt's runtime "
        f"(`Session(folder, backend=\"ort\")`). ONNX Runtime {ort.__version__} CPU EP, {m['processor']} with "
        f"{m['cpus']} cores shared with other jobs (load average {m['load_average_at_end'][0]:.1f} at the end), "
        f"median of {args.repeat} rounds, each running every variant in turn (all sessions loaded), {result['date']}.",
        "",
        "| variant | prefill 1x256 (ms) | vs canonical | decode (tok/s) | vs canonical | weights read per decode token | file size |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['variant']} | {row['prefill_ms']:.0f} | {row['prefill_speedup']:.2f}x | "
                     f"{row['decode_tok_s']:.2f} | {row['decode_speedup']:.2f}x | "
                     f"{row['decode_bytes_per_token'] / 1e6:.0f} MB | {row['file_bytes'] / 1e6:.0f} MB |")
    if quality:
        lines += [
            "",
            f"## Quality of quantized experts (trained `tiny`, heldout.txt, {quality['windows']}, {quality['tokens']} "
            "predicted tokens, against its fp32 export; optimize's defaults: blocks of 32, int8 activations in the "
            "expert GEMMs)",
            "",
            "| experts | perplexity | vs fp32 | logits max abs error | logits mean abs error | top-1 agreement |",
            "|---|---|---|---|---|---|",
            f"| fp32 | {quality['rows']['fp32']['perplexity']:.4f} | 1 | 0 | 0 | 100% |",
        ]
        for scheme in ("int8", "int4"):
            q = quality["rows"][scheme]
            lines.append(f"| {scheme} | {q['perplexity']:.4f} | {q['perplexity_ratio']:.5f} | {q['logits_max_abs']:.3f} | "
                         f"{q['logits_mean_abs']:.4f} | {100 * q['top1_agreement']:.2f}% |")
    lines += ["", "The transformers-exporter ORT peer named in issue 6 is not part of this run."]
    (args.out / "ort_optimize.md").write_text("\n".join(lines) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
