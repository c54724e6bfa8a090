"""Export a checkpoint larger than memory: wall time and peak resident memory of ``moetrt export``.

1. **Big**: a synthetic Mixtral checkpoint of ~27 GB bf16 (default: 9 layers with the
   dimensions of Mixtral-8x7B: hidden 4096, ffn 14336, 8 experts, 32 heads, 8 KV heads,
   vocab 32000). The per-tensor sizes are the real model's (one expert projection is
   14336 x 4096 bf16 = 117 MB, one layer's stacked gate/up ``[8, 28672, 4096]`` 1.9 GB), so
   the memory a streaming export needs is what Mixtral-8x7B's would need; only the layer count
   is cut, to what a 70 GB disk holds twice (checkpoint + export, with room to spare) while
   still exceeding a 24 GiB machine's RAM (9 layers: 26.6 GB = 24.8 GiB; 10 would be 30 GB).
   Written in Hugging Face's on-disk layout (``model.layers.{i}.block_sparse_moe.experts.{e}.w1
   .weight``, ...) as ~5 GB shards with ``model.safetensors.index.json``, random normal(0, 0.02)
   values, one tensor in memory at a time. Exported with ``onnx_from_torch(folder, out,
   dtype="bf16")`` (the streaming path) in a child process under ``/usr/bin/time -v``; then
   a few initializers of the export are compared with the checkpoint tensors they come from.
2. **bench-small** (the preset of benchmarks/bench_runtime_cpu.py, random weights seeded 0,
   fp32, 1.4 GB): peak memory of ``moetrt export`` from its checkpoint folder (streaming), from
   the model in memory (the preset name), and of transformers' own exporter on the same
   checkpoint (``AutoModelForCausalLM.from_pretrained`` + ``OnnxExporter().export_for_generation``,
   driven as bench_runtime_cpu.py drives it), each in its own child process, ``--repeat`` times.

Peak memory is the child's "Maximum resident set size" from GNU time (``/usr/bin/time -v``;
Debian package ``time``); where that is missing, ``resource.getrusage(RUSAGE_CHILDREN)`` after
the child exits (the report says which). Run one at a time on an otherwise quiet machine:
memory is what it is, but wall times move with the load.

    python benchmarks/bench_big_export.py [--layers 9] [--repeat 3] [--work DIR] [--keep]
                                          [--skip-big] [--skip-small] [--out benchmarks/results]

Writes ``big_export.json`` and ``big_export.md``. The synthetic checkpoint and its export are
deleted at the end unless ``--keep`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtime_cpu import machine_info  # noqa: E402  (one record of the machine for every benchmark)

REPO = Path(__file__).resolve().parent.parent
GNU_TIME = "/usr/bin/time"
SHARD_BYTES = 5 * 10**9  # Hugging Face's default max_shard_size
# Mixtral-8x7B's dimensions; the layer count is the benchmark's knob
BIG_CONFIG = dict(
    model_type="mixtral", architectures=["MixtralForCausalLM"], vocab_size=32000, hidden_size=4096,
    intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128, num_local_experts=8,
    num_experts_per_tok=2, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-5,
    rope_theta=1e6, sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    torch_dtype="bfloat16",
)
TARGET_RSS_GB = 4.0


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {message}", flush=True)


# --- the synthetic checkpoint -------------------------------------------------------------------

def big_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a Mixtral checkpoint, in Hugging Face's on-disk layout."""
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    out = [("model.embed_tokens.weight", (v, d))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [(f"{p}.input_layernorm.weight", (d,)), (f"{p}.post_attention_layernorm.weight", (d,)),
                (f"{p}.self_attn.q_proj.weight", (q, d)), (f"{p}.self_attn.k_proj.weight", (kv, d)),
                (f"{p}.self_attn.v_proj.weight", (kv, d)), (f"{p}.self_attn.o_proj.weight", (d, q)),
                (f"{p}.block_sparse_moe.gate.weight", (cfg["num_local_experts"], d))]
        for e in range(cfg["num_local_experts"]):
            out += [(f"{p}.block_sparse_moe.experts.{e}.w1.weight", (f, d)),
                    (f"{p}.block_sparse_moe.experts.{e}.w3.weight", (f, d)),
                    (f"{p}.block_sparse_moe.experts.{e}.w2.weight", (d, f))]
    out += [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]
    return out


def _tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(seed)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=generator)


def write_checkpoint(folder: Path, cfg: dict) -> int:
    """A sharded bf16 safetensors checkpoint, each tensor generated and written on its own; returns its bytes."""
    folder.mkdir(parents=True)
    tensors = big_tensors(cfg)
    shards, current, size = [], [], 0
    for name, shape in tensors:
        nbytes = torch.Size(shape).numel() * 2
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)
    weight_map, total, seed = {}, 0, 0
    for index, shard in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            nbytes = torch.Size(shape).numel() * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(folder / file, "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            for name, _shape in shard:
                seed += 1
                f.write(memoryview(_tensor(name, _shape, seed).view(torch.uint8).numpy()))
                weight_map[name] = file
        total += offset
        log(f"wrote {file} ({offset / 1e9:.2f} GB)")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return total


# --- measuring a child process ------------------------------------------------------------------

def measured(code: str, label: str) -> dict:
    """Run ``python -c code`` in a child; its wall time, peak RSS and exit status."""
    command = [sys.executable, "-c", textwrap.dedent(code)]
    use_time = Path(GNU_TIME).exists()
    if use_time:
        command = [GNU_TIME, "-v", *command]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    result = {"label": label, "wall_s": wall, "returncode": proc.returncode}
    if use_time:
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        result["peak_rss_gb"] = int(match[1]) * 1024 / 1e9 if match else None
        result["rss_source"] = "GNU time -v: Maximum resident set size"
    else:
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9
        result["rss_source"] = "resource.getrusage(RUSAGE_CHILDREN).ru_maxrss (largest child so far)"
    stages = re.findall(r"^\s+(.+?) done in ([\d.]+) s$", proc.stderr, flags=re.M)
    if stages:
        result["stages_s"] = {name: float(seconds) for name, seconds in stages}
    if proc.returncode != 0:
        result["error"] = proc.stderr[-3000:]
    log(f"{label}: {wall:.0f} s, peak RSS {result['peak_rss_gb'] or float('nan'):.2f} GB, rc {proc.returncode}")
    return result


EXPORT_CODE = """
import warnings; warnings.simplefilter("ignore")
from moetrt.export import onnx_from_torch
onnx_from_torch({source!r}, {out!r}, dtype={dtype!r}, streaming={streaming!r})
"""

OPTIMIZE_CODE = """
import warnings; warnings.simplefilter("ignore")
from moetrt.optimize import optimize
optimize({source!r}, {out!r}, target="ort-cpu", check_runtime=False, {options})
"""

PEER_CODE = """
import warnings; warnings.simplefilter("ignore")
import torch, transformers
from transformers.exporters import OnnxConfig, OnnxExporter
model = transformers.AutoModelForCausalLM.from_pretrained({source!r}, dtype=torch.float32,
                                                          attn_implementation="sdpa").eval()
sample = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
exported = OnnxExporter().export_for_generation(
    model, {{"input_ids": sample, "attention_mask": torch.ones_like(sample)}}, OnnxConfig(dynamic=True, ort_fusions="cpu"))
exported.save_pretrained({out!r})
"""


def verify_big(checkpoint: Path, export: Path, cfg: dict) -> dict:
    """Spot checks: initializers of the export against the checkpoint tensors they come from."""
    import ml_dtypes
    import numpy as np
    import onnx_ir as ir

    from moetrt.checkpoint import read_safetensors_header

    stored = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        stored.update({t.name: t for t in read_safetensors_header(shard)})
    model = ir.load(export / "model.onnx")
    inits = model.graph.initializers
    f, last = cfg["intermediate_size"], cfg["num_hidden_layers"] - 1

    def ckpt(name):
        return stored[name].read().view(torch.uint16).numpy().view(ml_dtypes.bfloat16)

    def onnx_slice(name, index):
        value = inits[name].const_value.numpy()[index]  # memory-mapped: only this slice is read
        return np.ascontiguousarray(value)

    checks = {}
    for layer in (0, last):
        p = f"model.layers.{layer}.block_sparse_moe.experts"
        gate_up, down = f"model.layers.{layer}.mlp.experts.gate_up_proj", f"model.layers.{layer}.mlp.experts.down_proj"
        for expert in (0, cfg["num_local_experts"] - 1):
            checks[f"layer {layer} expert {expert} w1 (gate rows)"] = np.array_equal(
                onnx_slice(gate_up, (expert, slice(0, f))), ckpt(f"{p}.{expert}.w1.weight"))
            checks[f"layer {layer} expert {expert} w3 (up rows)"] = np.array_equal(
                onnx_slice(gate_up, (expert, slice(f, 2 * f))), ckpt(f"{p}.{expert}.w3.weight"))
            checks[f"layer {layer} expert {expert} w2"] = np.array_equal(
                onnx_slice(down, expert), ckpt(f"{p}.{expert}.w2.weight"))
    embed = "model.embed_tokens.weight"
    checks["embed_tokens"] = np.array_equal(onnx_slice(embed, slice(None)), ckpt(embed))
    shapes = {n: tuple(v.shape) for n, v in inits.items() if v.shape is not None}
    lm_head = [n for n, s in shapes.items() if s == (cfg["hidden_size"], cfg["vocab_size"])]
    if len(lm_head) == 1:  # the exporter folds lm_head's transpose into one initializer
        checks["lm_head (transposed)"] = np.array_equal(onnx_slice(lm_head[0], slice(None)).T, ckpt("lm_head.weight"))
    return {"checks": checks, "all_equal": all(checks.values()), "initializers": len(inits)}


# --- report -------------------------------------------------------------------------------------

def versions() -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in ("moetrt", "torch", "onnx", "onnxscript", "onnx-ir", "onnxruntime", "transformers", "safetensors"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def summary(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["returncode"] == 0]
    rss = [r["peak_rss_gb"] for r in ok if r.get("peak_rss_gb") is not None]
    return {
        "runs": len(runs), "ok": len(ok),
        "median_wall_s": statistics.median(r["wall_s"] for r in ok) if ok else None,
        "median_peak_rss_gb": statistics.median(rss) if rss else None,
        "max_peak_rss_gb": max(rss) if rss else None,
        "error": next((r["error"] for r in runs if r["returncode"] != 0), None),
    }


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def write_report(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "big_export.json").write_text(json.dumps(report, indent=2) + "\n")
    m, v = report["machine"], report["versions"]
    lines = [
        "# Exporting a checkpoint larger than memory",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']} RAM; {m['platform']}.  ",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".  ",
        f"Peak memory: {report['rss_source']}. Recorded {report['date']}"
        + "".join(f" ({k} section from the run of {d})" for k, d in report.get("kept_from_earlier_runs", {}).items())
        + "; "
        "the machine was shared with other jobs (wall times move with the load, memory does not).",
        "",
    ]
    big = report.get("big")
    if big:
        run = big["export"]
        lines += [
            "## Big: synthetic Mixtral checkpoint, streamed export",
            "",
            f"{big['layers']} layers of Mixtral-8x7B's dimensions (hidden 4096, ffn 14336, 8 experts), bf16, "
            f"{big['checkpoint_gb']:.1f} GB in {big['shards']} shards; exported as bf16 "
            f"(`onnx_from_torch(folder, out, dtype=\"bf16\")`, streaming). Largest checkpoint tensor "
            f"{big['largest_tensor_gb']:.3f} GB; largest stacked initializer {big['largest_initializer_gb']:.2f} GB.",
            "",
            "| what | value |",
            "|---|---|",
            f"| checkpoint write | {big['write_s']:.0f} s |",
            f"| export wall time | {fmt(run['wall_s'], '.0f')} s |",
            f"| export peak RSS | {fmt(run.get('peak_rss_gb'), '.2f')} GB (target < {TARGET_RSS_GB:.0f} GB: "
            f"{'met' if (run.get('peak_rss_gb') or 1e9) < TARGET_RSS_GB else 'NOT met'}) |",
            f"| machine RAM | {m['memory']} |",
            f"| export size | {fmt(big.get('export_gb'), '.1f')} GB |",
            f"| spot checks equal to the checkpoint | {big.get('verify', {}).get('all_equal')} |",
            "",
        ]
        if run.get("stages_s"):
            lines += ["Stages (s): " + ", ".join(f"{k} {val:.0f}" for k, val in run["stages_s"].items()), ""]
        if run.get("error"):
            lines += ["Export failed:", "", "```", run["error"][-1500:], "```", ""]
    small = report.get("small")
    if small:
        lines += [
            f"## bench-small ({small['weight_gb']:.2f} GB fp32): peak memory of the exporters",
            "",
            f"Medians of {report['repeat']} runs, each in a fresh process.",
            "",
        ] + _rss_table("exporter", small["contenders"]) + [""]
        for name, entry in small["contenders"].items():
            lines.append(f"- {name}: {entry['how']}")
            if entry["summary"]["error"]:
                lines.append(f"  failed: `{entry['summary']['error'].strip().splitlines()[-1][:300]}`")
        lines += [""]
        if small.get("optimize"):
            lines += [
                "### bench-small: optimize passes that rewrite every weight they touch",
                "",
                "On the streamed fp32 export (weights in model.onnx.data): the passes leave rewritten weights "
                "lazy and the save computes them one at a time.",
                "",
            ] + _rss_table("optimize", small["optimize"])
            lines += [""] + [f"- {name}: {entry['how']}" for name, entry in small["optimize"].items()] + [""]
    lines += ["Reproduce: `python benchmarks/bench_big_export.py` (both parts; `--skip-big` or `--skip-small` runs "
              "one and keeps the other's recorded numbers). This report: `" + report["command"] + "`", ""]
    (out / "big_export.md").write_text("\n".join(lines))


def _rss_table(what: str, entries: dict) -> list[str]:
    """Markdown rows: median / max peak RSS, median wall time and successful runs of each entry."""
    rows = [f"| {what} | median peak RSS (GB) | max (GB) | median wall (s) | runs ok |", "|---|---|---|---|---|"]
    for name, entry in entries.items():
        s = entry["summary"]
        rows.append(f"| {name} | {fmt(s['median_peak_rss_gb'], '.2f')} | {fmt(s['max_peak_rss_gb'], '.2f')} | "
                    f"{fmt(s['median_wall_s'], '.0f')} | {s['ok']}/{s['runs']} |")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=9, help="layers of the big checkpoint (default 9: 26.6 GB)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per bench-small exporter (medians)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the artifacts (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and its export")
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--skip-small", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="moetrt-big-export-"))
    work.mkdir(parents=True, exist_ok=True)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine_info(), "versions": versions(),
        "rss_source": ("GNU time -v (Maximum resident set size of the child)" if Path(GNU_TIME).exists()
                       else "resource.getrusage(RUSAGE_CHILDREN) (GNU time not installed)"),
        "repeat": args.repeat, "command": "python benchmarks/bench_big_export.py " + " ".join(argv or sys.argv[1:]),
    }
    previous = args.out / "big_export.json"
    if previous.exists():  # a section this run skips keeps its last recorded numbers
        with contextlib.suppress(json.JSONDecodeError):
            old = json.loads(previous.read_text())
            for section, skipped in (("big", args.skip_big), ("small", args.skip_small)):
                if skipped and section in old:
                    report[section] = old[section]
                    report.setdefault("kept_from_earlier_runs", {})[section] = old.get("date")
    try:
        if not args.skip_big:
            cfg = dict(BIG_CONFIG, num_hidden_layers=args.layers)
            tensors = big_tensors(cfg)
            need = sum(torch.Size(s).numel() * 2 for _, s in tensors)
            free = shutil.disk_usage(work).free
            if free < 2 * need + 5 * 10**9:
                raise SystemExit(f"{work} has {free / 1e9:.0f} GB free; the checkpoint and its export need "
                                 f"{2 * need / 1e9:.0f} GB (+5 GB margin): pass --work on a larger disk or fewer --layers")
            checkpoint, export = work / "big-checkpoint", work / "big-export"
            start = time.perf_counter()
            if not (checkpoint / "config.json").exists():
                shutil.rmtree(checkpoint, ignore_errors=True)
                write_checkpoint(checkpoint, cfg)
            write_s = time.perf_counter() - start
            shutil.rmtree(export, ignore_errors=True)
            run = measured(EXPORT_CODE.format(source=str(checkpoint), out=str(export), dtype="bf16", streaming=None),
                           "big export (streaming)")
            big = {
                "layers": args.layers, "config": cfg, "checkpoint_gb": need / 1e9, "write_s": write_s,
                "shards": len(list(checkpoint.glob("*.safetensors"))),
                "largest_tensor_gb": max(torch.Size(s).numel() * 2 for _, s in tensors) / 1e9,
                "largest_initializer_gb": 2 * cfg["num_local_experts"] * cfg["intermediate_size"] * cfg["hidden_size"] * 2 / 1e9,
                "export": run,
            }
            if run["returncode"] == 0:
                big["export_gb"] = sum(p.stat().st_size for p in export.iterdir()) / 1e9
                big["verify"] = verify_big(checkpoint, export, cfg)
                log(f"spot checks: {big['verify']['checks']}")
            report["big"] = big
            if not args.keep:
                shutil.rmtree(checkpoint, ignore_errors=True)
                shutil.rmtree(export, ignore_errors=True)
            write_report(args.out, report)  # the big numbers are safe before the small runs start

        if not args.skip_small:
            import moetrt

            checkpoint = work / "small-checkpoint"
            if not (checkpoint / "config.json").exists():
                model = moetrt.MoETransformer.from_config(moetrt.MoEConfig.from_name("bench-small")).eval()
                moetrt.save_pretrained(model, checkpoint)
                del model
            weight_gb = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors")) / 1e9
            contenders = {
                "moetrt, checkpoint folder (streaming)": (
                    EXPORT_CODE, dict(source=str(checkpoint), dtype="fp32", streaming=None),
                    "onnx_from_torch(checkpoint folder, out) (fp32, streamed)"),
                "moetrt, model in memory": (
                    EXPORT_CODE, dict(source=str(checkpoint), dtype="fp32", streaming=False),
                    "onnx_from_torch(checkpoint folder, out, streaming=False): from_pretrained, then trace (fp32)"),
                "transformers exporter": (
                    PEER_CODE, dict(source=str(checkpoint)),
                    "AutoModelForCausalLM.from_pretrained(checkpoint, fp32, sdpa) + transformers.exporters."
                    "OnnxExporter().export_for_generation(model, ..., OnnxConfig(dynamic=True, ort_fusions='cpu'))"
                    ".save_pretrained(out): prefill and decode graphs"),
            }
            # the optimize passes that rewrite weights, on the streamed export (external data)
            export = work / "small-export"
            if not (export / "moetrt.json").exists():
                measured(EXPORT_CODE.format(source=str(checkpoint), out=str(export), dtype="fp32", streaming=None),
                         "export for the optimize runs")
            optimizers = {
                "moetrt optimize, int4 experts (QMoE)": (
                    OPTIMIZE_CODE, dict(source=str(export), options='quantize_experts="int4"'),
                    "optimize(streamed export, out, target='ort-cpu', quantize_experts='int4'): every expert "
                    "weight quantized and re-laid out"),
                "moetrt optimize, MoE lowering always": (
                    OPTIMIZE_CODE, dict(source=str(export), options='moe_lowering="always"'),
                    "optimize(streamed export, out, target='ort-cpu', moe_lowering='always'): every gate/up "
                    "weight interleaved for com.microsoft::MoE"),
                "moetrt optimize, int4 experts + int4 other weights": (
                    OPTIMIZE_CODE, dict(source=str(export), options='quantize_experts="int4", quantize_weights="int4"'),
                    "optimize(streamed export, out, target='ort-cpu', quantize_experts='int4', "
                    "quantize_weights='int4'): every expert weight to QMoE, every other linear weight but the "
                    "router's to MatMulNBits"),
            }
            small = {"weight_gb": weight_gb, "contenders": {}, "optimize": {}}
            runs = {name: [] for name in [*contenders, *optimizers]}
            for round_ in range(args.repeat):
                for name, (code, kwargs, _how) in [*contenders.items(), *optimizers.items()]:  # interleaved
                    out = work / f"small-out-{round_}"
                    shutil.rmtree(out, ignore_errors=True)
                    runs[name].append(measured(code.format(out=str(out), **kwargs), f"{name} #{round_ + 1}"))
                    shutil.rmtree(out, ignore_errors=True)
            for name, (_code, _kwargs, how) in contenders.items():
                small["contenders"][name] = {"how": how, "summary": summary(runs[name]), "runs": runs[name]}
            for name, (_code, _kwargs, how) in optimizers.items():
                small["optimize"][name] = {"how": how, "summary": summary(runs[name]), "runs": runs[name]}
            report["small"] = small
            write_report(args.out, report)
    finally:
        if not args.keep:
            shutil.rmtree(work / "big-checkpoint", ignore_errors=True)
            shutil.rmtree(work / "big-export", ignore_errors=True)
            if args.work is None:
                shutil.rmtree(work, ignore_errors=True)
    log(f"wrote {args.out / 'big_export.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
