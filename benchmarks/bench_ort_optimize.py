"""What `moetrt optimize --target ort-cpu` buys on ONNX Runtime CPU: bench-small, prefill and decode,
against the transformers-exporter peer measured in the same run.

The ``bench-small`` preset (random weights seeded 0: d 1024, 4 layers, 8 experts of ffn 3584, top-2,
vocab 32000) is exported once, optimized into each variant below, and run by moetrt's own runtime
(``Session(folder, backend="ort")``, IO binding, KV cache as OrtValues); the peer is transformers'
own ONNX export of the same weights (``OnnxExporter().export_for_generation``, prefill and decode
graphs with ``ort_fusions="cpu"``) run by its own ONNX Runtime runners. Both are built, and the
peer is run, by the code of ``bench_runtime_cpu.py`` (``build_moetrt``, ``build_peer``,
``peer_run``, ``moetrt_run``), so the two benchmarks measure the same peer the same way.

    canonical              the export: moetrt::TopKRouting + moetrt::SparseMoE function bodies
    fp32 optimized         optimize's default: com.microsoft::MoE for decode steps where it wins
    int8 experts           --quantize-experts int8 (com.microsoft::QMoE, blocks of 32, int8 activations)
    int4 experts           --quantize-experts int4 (int8 activations inside the expert GEMMs)
    int8 experts + int8 weights   --quantize-experts int8 --quantize-weights int8
    int4 experts + int8 weights   --quantize-experts int4 --quantize-weights int8 (MatMulNBits, blocks of 128,
                                  accuracy_level 4: the attention projections and lm_head)
    int4 experts + int4 weights   --quantize-experts int4 --quantize-weights int4
    ... + fused norms      the same with --fuse-norms (RMSNorms as ONNX Runtime's SimplifiedLayerNormalization
                           and SkipSimplifiedLayerNormalization kernels)
    ... + last logits      the same with --last-logits (final norm and lm_head on the last position only:
                           logits [1, 1, V], transformers' logits_to_keep=1)
    transformers exporter  the peer

A run is a prefill of one 1 x ``--prompt`` prompt, then ``--decode-tokens`` greedy single-token
steps. All sessions stay loaded and every round runs every contender once, in an order rotating
round by round, so load from other jobs on a shared machine falls on all of them alike. Reported
per contender: medians (and bests) over rounds, and the ratios to the peer taken within each
round and then their median; the bytes of weights one decode step must read at batch 1 (every
non-expert weight, one embedding row, K/E of the expert weights, the KV cache of the context).

The quality cost of quantization is measured on the trained ``tiny`` preset (held-out perplexity
and logits against its fp32 export), since bench-small's weights are random.

    python benchmarks/bench_ort_optimize.py [--repeat 10] [--decode-tokens 32] [--work DIR] [--out benchmarks/results]

Writes ``ort_optimize.json`` and ``ort_optimize.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_runtime_cpu as peer_bench  # noqa: E402 (the peer's build and run, shared with that benchmark)

PEER = peer_bench.PEER
# variant -> optimize options (None: the canonical export; "optimized": bench_runtime_cpu's default folder)
VARIANTS = {
    "canonical": None,
    "fp32 optimized": "optimized",
    "int8 experts": dict(quantize_experts="int8"),
    "int4 experts": dict(quantize_experts="int4"),
    "int8 experts + int8 weights": dict(quantize_experts="int8", quantize_weights="int8"),
    "int4 experts + int8 weights": dict(quantize_experts="int4", quantize_weights="int8"),
    "int4 experts + int4 weights": dict(quantize_experts="int4", quantize_weights="int4"),
    "fp32 optimized + fused norms": dict(fuse_norms=True),
    "int4 experts + int8 weights + fused norms": dict(quantize_experts="int4", quantize_weights="int8", fuse_norms=True),
    "fp32 optimized + last logits": dict(last_logits=True),
    "int4 experts + int8 weights + last logits": dict(quantize_experts="int4", quantize_weights="int8",
                                                      last_logits=True),
}
# issue 6: ratios to the peer (prefill: its time over ours; decode: our tok/s over its)
TARGETS = {
    "fp32 optimized": {"decode": 1.0, "prefill": 1.2},
    "int8 experts": {"decode": 1.6},
    "int4 experts": {"decode": 2.5},
    "int4 experts + int8 weights": {"decode": 2.5},
    "fp32 optimized + last logits": {"decode": 1.0, "prefill": 1.2},
    "int4 experts + int8 weights + last logits": {"decode": 2.5},
}
# the trained tiny model: fp32 vs each quantization, optimize's defaults otherwise
QUALITY = {
    "int8 experts": dict(quantize_experts="int8"),
    "int4 experts": dict(quantize_experts="int4"),
    "int8 weights": dict(quantize_weights="int8"),
    "int4 weights": dict(quantize_weights="int4"),
    "int8 experts + int8 weights": dict(quantize_experts="int8", quantize_weights="int8"),
    "int4 experts + int8 weights": dict(quantize_experts="int4", quantize_weights="int8"),
    "int4 experts + int4 weights": dict(quantize_experts="int4", quantize_weights="int4"),
}


FUSIONS = """## Transformer fusions (GroupQueryAttention, rotary, SkipSimplifiedLayerNormalization)

Op counts on the exported `tiny` graph (bench-small's has the same structure: 4 layers, one
RMSNorm before attention and one before the MoE per layer, a final norm, 4 MoE layers):

| graph | RMSNorm as 6 ops (Pow) | SimplifiedLayerNormalization | SkipSimplifiedLayerNormalization | RotaryEmbedding | GroupQueryAttention / MultiHeadAttention | moetrt functions kept |
|---|---|---|---|---|---|---|
| exported (canonical) | 9 | 0 | 0 | 0 | 0 | yes (4 TopKRouting, 4 SparseMoE) |
| after ONNX Runtime's own session optimizations (`optimized_model_filepath`, level basic / extended / all) | 9 | 0 | 0 | 0 | 0 | inlined by ORT at load; only 4 `FusedMatMul` (transpose into Q K^T) appear at extended/all |
| onnxscript's ORT fusions (what transformers' exporter runs with `ort_fusions="cpu"`), applied rule set by rule set without inlining | 0 | 1 | 8 | 0 (8 intermediate rotary matches, no cos/sin cache match) | 0 (SDPA and GQA rules: no match) | yes |
| `onnxruntime.transformers.optimizer.optimize_model(model_type="gpt2" or "bert", opt_level=0)` | 0 | 1 | 8 | 0 | 0 | yes |

- ONNX Runtime's session-level (C++) optimizers fuse none of these on moetrt's graphs: the RMSNorm is
  `Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul`, and no level rewrites it.
- The norm fusions apply cleanly: onnxscript's `rms_normalization` and `skip_normalization` rules keep the
  moetrt functions and the outputs (max abs logits difference 4e-6 on bench-small prefill, 1e-5 on tiny;
  the test `tests/optimize/test_transformer_fusions.py` asserts fp32 parity against the reference in
  prefill and decode on tiny and the qwen3_moe family, whose per-head q/k norms fuse too). They are the
  pass `moetrt.optimize.transformer_fusions.fuse_norms` (`moetrt optimize --fuse-norms`), measured in the
  table above ("+ fused norms").
- Rotary: onnxscript's rotary rule matches our `q * cos + rotate_half(q) * sin` (8 matches on tiny) but its
  cos/sin-cache rule does not match how the export computes the angles (from `position_ids` in the graph),
  so no `com.microsoft::RotaryEmbedding` results and the partial matches are inlined back.
- GroupQueryAttention / MultiHeadAttention: neither onnxscript's SDPA/GQA rules nor onnxruntime.transformers'
  attention fusions (`gpt2`, `bert`) match the exported attention (KV heads repeated with
  Reshape/Expand before the score MatMul, explicit additive mask, KV cache concatenated in the graph).
  Fusing it needs the export to emit an SDPA-shaped attention or a moetrt pattern pass producing GQA with
  its cache semantics (`past_present_share_buffer`, `seqlens_k`) which the runtime's KV-cache handling
  would have to follow: not done here.
- Prefill on bench-small is compute-bound: profiling one 1x256 prefill of the fp32 optimized folder puts
  93% of kernel time in `MatMul` (experts, projections and the lm_head over all 256 positions); norms,
  rotary and attention glue are the remaining few percent, so these fusions cannot move prefill by 1.2x;
  `--last-logits` removes the lm_head's 255 unused positions instead (above).
"""


LAST_LOGITS = """`--last-logits` slices the hidden states to the last position before the final norm and the lm_head
(`logits` [B, 1, V], what generation reads; `present.*` unchanged). On bench-small the lm_head is
d 1024 x vocab 32000: 2 x 256 x 1024 x 32000 = 16.8 GFLOP of a 1x256 prefill's 68.3 GFLOP (experts, top-2
of 8 x 3 x 1024 x 3584 per token: 45.1; attention projections 5.4; attention scores 1.1), so at most 1.32x
on prefill if every FLOP cost the same; decode (one position) cannot change. The quality table above is unaffected
(perplexity needs every position's logits: score with a folder built without `--last-logits`)."""


def export(model, folder: Path) -> None:
    from moetrt.export import onnx_from_torch

    if (folder / "moetrt.json").exists():
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_from_torch(model, folder, progress=False)


def optimized(src: Path, work: Path, name: str, options) -> Path:
    from moetrt.optimize import optimize

    if options is None:
        return src
    if options == "optimized":
        return work / "optimized"
    out = work / "".join(c if c.isalnum() or c in "-_" else "-" for c in name)
    if not (out / "moetrt.json").exists():
        with peer_bench.quiet():
            optimize(src, out, "ort-cpu", progress=False, **options)
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


def measure(folders: dict[str, Path], work: Path, prompt: list[int], steps: int, repeat: int, threads: int) -> dict:
    """Load every contender (the peer too), then ``repeat`` rounds of each, order rotating round by round."""
    runs, load_s = {}, {}
    for name, folder in folders.items():
        start = time.perf_counter()
        if name == PEER:
            runs[name] = peer_bench.peer_run(work / "peer", prompt, steps, threads)
        else:
            runs[name] = peer_bench.moetrt_run(folder, prompt, steps, backend="ort",
                                               session_options=peer_bench.ort_options(threads))
        load_s[name] = time.perf_counter() - start
    tokens = {name: run()[3] for name, run in runs.items()}  # warm-up
    peer_bench.log(f"loaded {len(runs)} contenders ({peer_bench.rss_gb():.1f} GB resident)")
    prefill: dict[str, list[float]] = {name: [] for name in runs}
    decode: dict[str, list[float]] = {name: [] for name in runs}
    loads = []
    order = list(runs)
    for round_ in range(repeat):
        for name in order[round_ % len(order):] + order[: round_ % len(order)]:
            seconds, decode_seconds, steps_run, _ = runs[name]()
            prefill[name].append(seconds * 1e3)
            decode[name].append(steps_run / decode_seconds)
        loads.append(os.getloadavg()[0])
        peer_bench.log(f"round {round_ + 1}: " + ", ".join(
            f"{name} {prefill[name][-1]:.0f} ms / {decode[name][-1]:.0f} tok/s" for name in order))
    return {"prefill_ms": prefill, "decode_tok_s": decode, "load_s": load_s, "tokens": tokens,
            "load_after_round": loads, "peak_rss_gb": peer_bench.peak_rss_gb()}


def ratios_to_peer(prefill: list[float], decode: list[float], peer_prefill: list[float], peer_decode: list[float]):
    """Medians over rounds of (peer prefill time / ours, our decode tok/s / peer's), taken within each round."""
    return (statistics.median(p / r for p, r in zip(peer_prefill, prefill)),
            statistics.median(r / p for r, p in zip(decode, peer_decode)))


def tiny_quality(work: Path) -> dict:
    """Held-out perplexity and logits error of the trained tiny model: fp32 vs each quantization."""
    import moetrt

    return heldout_quality(moetrt.from_pretrained("tiny"), work, "tiny")


def heldout_quality(model, work: Path, name: str, quality: dict | None = None) -> dict:
    """Held-out perplexity and logits error of ``model`` (tiny's tokenizer and heldout.txt): fp32 vs each
    of ``quality`` (default :data:`QUALITY`), exported and optimized under ``work`` as ``quality-{name}-*``."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    import moetrt

    src = work / f"quality-{name}-canonical"
    export(model, src)
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
                if inp.name.startswith("past_key_values"):  # batch first, the past axis (a name) empty
                    shape = [len(x)] + [d if isinstance(d, int) else 0 for d in inp.shape[1:]]
                    feeds[inp.name] = np.zeros(shape, np.float32)
            logits = sess.run(["logits"], feeds)[0].astype(np.float64)
            top = logits.max(-1, keepdims=True)
            nats += float((np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
                           - np.take_along_axis(logits, y[..., None], -1)[..., 0]).sum())
            count += y.size
            logits_all.append(logits.astype(np.float32))
        return math.exp(nats / count), np.concatenate(logits_all), count

    ppl32, logits32, count = evaluate(src)
    rows = {"fp32": {"perplexity": ppl32}}
    for row, options in (QUALITY if quality is None else quality).items():
        folder = optimized(src, work, f"quality-{name}-{row}", options)
        ppl, logits, _ = evaluate(folder)
        error = np.abs(logits - logits32)
        rows[row] = {"perplexity": ppl, "perplexity_ratio": ppl / ppl32, "logits_max_abs": float(error.max()),
                     "logits_mean_abs": float(error.mean()),
                     "top1_agreement": float((logits.argmax(-1) == logits32.argmax(-1)).mean())}
    return {"tokens": count, "windows": f"{len(starts)} x {seq} tokens", "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=10, help="rounds after the warm-up")
    parser.add_argument("--prompt", type=int, default=256, help="prefill tokens (batch 1)")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--work", type=Path, default=None, help="keep the exported/optimized folders here (reused)")
    parser.add_argument("--skip-quality", action="store_true")
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
    # the checkpoint, canonical export and default optimized folder; then transformers' export of the checkpoint
    built = peer_bench.in_subprocess(peer_bench.build_moetrt, args.work, args.threads)
    peer_built = peer_bench.in_subprocess(peer_bench.build_peer, args.work, "cpu", args.threads)
    src = args.work / "canonical"
    folders = {name: optimized(src, args.work, name, VARIANTS[name]) for name in args.variants}
    if "error" not in peer_built:
        folders[PEER] = args.work / "peer"
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, args.prompt).tolist()
    measured = peer_bench.in_subprocess(measure, folders, args.work, prompt, args.decode_tokens, args.repeat,
                                        args.threads)

    context = args.prompt + args.decode_tokens // 2
    kv_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * context * 4
    peer_ok = PEER in folders
    rows = []
    for name, folder in folders.items():
        prefill, decode = measured["prefill_ms"][name], measured["decode_tok_s"][name]
        row = {"variant": name, "prefill_ms": statistics.median(prefill), "prefill_ms_best": min(prefill),
               "decode_tok_s": statistics.median(decode), "decode_tok_s_best": max(decode),
               "prefill_ms_runs": prefill, "decode_tok_s_runs": decode, "load_s": measured["load_s"][name],
               "tokens": measured["tokens"][name]}
        if name == PEER:
            row["decode_bytes_per_token"] = peer_bench.decode_weight_bytes(cfg)["total"] + kv_bytes
            row["file_bytes"] = sum(p.stat().st_size for p in folder.rglob("*.onnx*"))
        else:
            row["decode_bytes_per_token"] = decode_bytes_per_token(folder, context)
            row["file_bytes"] = sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))
        row["prefill_vs_peer"] = row["decode_vs_peer"] = None
        if peer_ok:
            row["prefill_vs_peer"], row["decode_vs_peer"] = ratios_to_peer(
                prefill, decode, measured["prefill_ms"][PEER], measured["decode_tok_s"][PEER])
        rows.append(row)
        print(f"{name}: prefill {row['prefill_ms']:.0f} ms, decode {row['decode_tok_s']:.2f} tok/s, "
              f"{row['decode_bytes_per_token'] / 1e6:.0f} MB/token", flush=True)
    canonical = next((r for r in rows if r["variant"] == "canonical"), rows[0])
    for row in rows:
        row["prefill_vs_canonical"] = canonical["prefill_ms"] / row["prefill_ms"]
        row["decode_vs_canonical"] = row["decode_tok_s"] / canonical["decode_tok_s"]
        first = next((i for i, (a, b) in enumerate(zip(row["tokens"], canonical["tokens"])) if a != b), None)
        row["same_tokens_as_canonical"] = "yes" if first is None else f"from token {first}"
    quality = None if args.skip_quality else tiny_quality(args.work)

    result = {
        "benchmark": "bench-small on ONNX Runtime CPU: moetrt optimize variants vs the transformers-exporter peer",
        "command": " ".join(["python benchmarks/bench_ort_optimize.py", *peer_bench.named_work(sys.argv[1:] if argv is None else argv)]),
        "config": {k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers", "num_experts", "num_experts_per_tok",
                                                "intermediate_size", "vocab_size")},
        "workload": {"batch": 1, "prompt": args.prompt, "decode_tokens": args.decode_tokens, "repeat": args.repeat,
                     "threads": args.threads},
        "machine": peer_bench.machine_info(args.threads),
        "versions": peer_bench.versions(),
        "load_average": {"before": load_before, "after": os.getloadavg(),
                         "after_each_round": measured["load_after_round"]},
        "wall_seconds": time.perf_counter() - started,
        "peak_rss_gb": measured["peak_rss_gb"],
        "peer_error": peer_built.get("error"),
        "targets": TARGETS,
        "rows": rows,
        "tiny_quality": quality,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ort_optimize.json").write_text(json.dumps(result, indent=2) + "\n")
    write_report(args.out / "ort_optimize.md", result)
    if tmp is not None:
        tmp.cleanup()
    print((args.out / "ort_optimize.md").read_text())
    return 0


def write_report(path: Path, result: dict) -> None:
    m, v, w, loads = result["machine"], result["versions"], result["workload"], result["load_average"]
    fmt = peer_bench.fmt
    rounds = loads["after_each_round"]
    lines = [
        "# moetrt optimize --target ort-cpu: bench-small on ONNX Runtime CPU, against the transformers-exporter peer",
        "",
        (f"{result['date']}. {m['cpu']}, {m['cores']} cores shared with other jobs, {w['threads']} threads for every "
         f"contender, {m['memory']}, {m['platform']}."),
        (f"Python {v['python']}, torch {v['torch']}, onnxruntime {v['onnxruntime']}, transformers {v['transformers']}, "
         f"onnx {v['onnx']}, onnxscript {v['onnxscript']}, moetrt {v['moetrt']} ({v['moetrt_commit']})."),
        (f"bench-small (d 1024, 4 layers, 8 experts x ffn 3584, top-2, vocab 32000, random weights), batch 1: prefill "
         f"of {w['prompt']} tokens, then {w['decode_tokens']} greedy decode steps. moetrt's folders run through its "
         "runtime (`Session(folder, backend=\"ort\")`); the peer is transformers' `OnnxExporter().export_for_generation"
         "(..., OnnxConfig(dynamic=True, ort_fusions=\"cpu\"))` of the same weights on its own ONNX Runtime runners "
         "(built and run by `bench_runtime_cpu.py`'s code). All sessions loaded together; one warm-up, then "
         f"{w['repeat']} rounds, each running every contender once in a rotating order. Command: `{result['command']}` "
         f"({result['wall_seconds'] / 60:.1f} min, peak memory of the measuring process {result['peak_rss_gb']:.1f} GB)."),
        (f"Load average (1/5/15 min): {' / '.join(f'{x:.2f}' for x in loads['before'])} before, "
         f"{' / '.join(f'{x:.2f}' for x in loads['after'])} after; 1-min after each round {min(rounds):.2f}-"
         f"{max(rounds):.2f}. Two cores shared with other jobs: single runs move with the load, so ratios are "
         "taken within each round and their median reported."),
        "",
        ("| variant | prefill 1x256 ms: median (best) | prefill vs peer | decode tok/s: median (best) | decode vs peer "
         "| vs canonical (prefill / decode) | weights read per decode token | file size | greedy tokens = canonical |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['variant']} | {row['prefill_ms']:.0f} ({row['prefill_ms_best']:.0f}) | "
            f"{fmt(row['prefill_vs_peer'], '.2f', 'x')} | {row['decode_tok_s']:.1f} ({row['decode_tok_s_best']:.1f}) | "
            f"{fmt(row['decode_vs_peer'], '.2f', 'x')} | {row['prefill_vs_canonical']:.2f}x / "
            f"{row['decode_vs_canonical']:.2f}x | {row['decode_bytes_per_token'] / 1e6:.0f} MB | "
            f"{row['file_bytes'] / 1e6:.0f} MB | {row['same_tokens_as_canonical']} |")
    lines += ["", ("*vs peer*: median over rounds of the ratio within a round (prefill: the peer's time over this one; "
                   "decode: tokens/s over the peer's; above 1 is faster). Weights read per decode token: every "
                   "non-expert weight, one embedding row, K/E of the expert weights and the KV cache at the middle of "
                   "decode (the peer: the same fp32 weights). Quantized variants are random-weight models, so their "
                   "greedy tokens may differ from the fp32 ones; the quality cost is measured below on the trained "
                   "tiny model."), "", "**Targets** (issue 6, against the peer of the same run):", ""]
    by_name = {row["variant"]: row for row in result["rows"]}
    for name, targets in result["targets"].items():
        row = by_name.get(name)
        if row is None or row["decode_vs_peer"] is None:
            continue
        parts = []
        for kind, want in targets.items():
            got = row[f"{kind}_vs_peer"]
            parts.append(f"{kind} {got:.2f}x (target >= {want}x: {'met' if got >= want else 'not met'})")
        lines.append(f"- {name}: " + ", ".join(parts) + ".")
    quality = result["tiny_quality"]
    if quality:
        lines += [
            "",
            f"## Quality (trained `tiny`, heldout.txt, {quality['windows']}, {quality['tokens']} predicted tokens, "
            "against its fp32 export; optimize's defaults: blocks of 32 (int8 weights: 128), symmetric, int8 "
            "activations inside QMoE and MatMulNBits)",
            "",
            "| quantized | perplexity | vs fp32 | logits max abs error | logits mean abs error | top-1 agreement |",
            "|---|---|---|---|---|---|",
            f"| nothing (fp32) | {quality['rows']['fp32']['perplexity']:.4f} | 1 | 0 | 0 | 100% |",
        ]
        for name, q in quality["rows"].items():
            if name != "fp32":
                lines.append(f"| {name} | {q['perplexity']:.4f} | {q['perplexity_ratio']:.5f} | "
                             f"{q['logits_max_abs']:.3f} | {q['logits_mean_abs']:.4f} | {100 * q['top1_agreement']:.2f}% |")
    for suffix, title in ((" + fused norms", "**Fused norms** (`--fuse-norms`)"),
                          (" + last logits", "**Last logits** (`--last-logits`)")):
        pairs = [(name, name.replace(suffix, "")) for name in by_name if name.endswith(suffix)]
        pairs = [(option, plain) for option, plain in pairs if plain in by_name]
        if not pairs:
            continue
        lines += ["", f"{title}, against the same variant without it, median of within-round ratios:", ""]
        for option, plain in pairs:
            prefill, decode = ratios_to_peer(by_name[option]["prefill_ms_runs"], by_name[option]["decode_tok_s_runs"],
                                             by_name[plain]["prefill_ms_runs"], by_name[plain]["decode_tok_s_runs"])
            lines.append(f"- {plain}: prefill {prefill:.3f}x, decode {decode:.3f}x.")
    if any(name.endswith(" + last logits") for name in by_name):
        lines += ["", LAST_LOGITS]
    lines += ["", FUSIONS]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
