"""moetrt's runtime against its peers on the CPU: bench-small, prefill 1x256, greedy decode, fp32.

One model (the ``bench-small`` preset, random weights seeded 0: vocab 32000, d 1024, 8 experts of
ffn 3584, top-2, 4 layers, 8 heads, 2 KV heads) runs, with the same weights, on

    transformers eager      the Hugging Face checkpoint moetrt writes (``save_pretrained``), loaded by
                            ``AutoModelForCausalLM`` (sdpa attention, its default experts implementation),
                            plain PyTorch: prefill = one forward on the prompt, decode = a manual
                            KV-cache loop (its tokens are checked against ``model.generate``)
    transformers exporter   ``transformers.exporters.OnnxExporter().export_for_generation`` (prefill and
                            decode graphs, ``OnnxConfig(dynamic=True, ort_fusions="cpu")``) run by its own
                            ONNX Runtime runners (``ExportedModel.from_pretrained``): the strongest peer
    moetrt torch            ``Session(model, backend="torch")``
    moetrt ORT canonical    ``Session(onnx_from_torch(model, ...), backend="ort")``
    moetrt ORT optimized    ``Session(optimize(canonical, ..., target="ort-cpu"), backend="ort")``, when
                            ``moetrt.optimize`` is installed and works

A run is a prefill of the prompt then ``--decode-tokens`` single-token greedy steps (no stop
token). Every contender uses the same threads (``--threads``, default all cores).

The machine may be shared, and a 2-core CPU that another job takes a core from runs a
2-thread contender several times slower. So contenders run round-robin, one run each per round
(the order rotating), in two groups: the PyTorch pair, then the ONNX Runtime group (the peer and
moetrt's ONNX Runtime folders). Reported per contender: the median and the best of ``--repeat``
runs after one warm-up, and ratios taken round by round (against the peer's run of the same
round, and against the floor measured right after that round) and then their median, so load
from elsewhere falls on both sides of a ratio alike. The PyTorch pair's ratios to the peer are
ratios of medians across the two groups (marked). Each group runs in its own process, so the
peak memory is the largest group's (~13 GB: the ONNX Runtime sessions), not the sum.

The decode floor: a batch-1 decode step must read every weight it uses once (one embedding row,
attention, norms, router, the k routed experts of each layer, the final norm and lm_head, fp32);
over the read rate of a large ONNX Runtime MatMul ([1, 4096] x [4096, 16384] fp32, weight bytes
over the median time, measured after every round) that is the fastest decode memory allows.
The KV cache read (~2 MB here) is left out.

    python benchmarks/bench_runtime_cpu.py [--repeat 10] [--decode-tokens 32] [--threads N]
                                           [--work DIR] [--out benchmarks/results]

Writes ``runtime_cpu.json`` and ``runtime_cpu.md``. Artifacts (checkpoint and exports, ~8.5 GB)
go to a temporary folder deleted at the end, unless ``--work DIR`` names one to keep and reuse.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

PRESET = "bench-small"
PEER = "transformers exporter"
TORCH_GROUP = ["moetrt torch", "transformers eager"]
ORT_GROUP = [PEER, "moetrt ORT canonical", "moetrt ORT optimized"]
CONTENDERS = ["transformers eager", PEER, "moetrt torch", "moetrt ORT canonical", "moetrt ORT optimized"]
TARGETS = {"decode_vs_peer": 1.0, "prefill_vs_peer": 1.2}
FLOOR_SHAPE = (4096, 16384)  # the MatMul weight [K, N] whose read rate sets the floor
HOW = {
    "transformers eager": "transformers AutoModelForCausalLM from moetrt's checkpoint, fp32, attn_implementation="
                          "'sdpa'; prefill = model(prompt), decode = a manual DynamicCache greedy loop",
    PEER: "transformers.exporters.OnnxExporter().export_for_generation(model, ..., OnnxConfig(dynamic=True, "
          "ort_fusions={fusions!r})): its prefill and decode graphs on ONNX Runtime CPU through "
          "ExportedModel.from_pretrained(...).runners",
    "moetrt torch": "Session(model, backend='torch').generate",
    "moetrt ORT canonical": "onnx_from_torch(model, folder) -> Session(folder, backend='ort').generate",
    "moetrt ORT optimized": "moetrt.optimize.optimize(canonical, folder, target='ort-cpu') -> "
                            "Session(folder, backend='ort').generate",
}

# one run: () -> (prefill seconds, decode seconds, decode steps, greedy tokens)
Run = Callable[[], tuple[float, float, int, list[int]]]


@dataclass(eq=False)  # hashed by identity: a key of the round-robin
class Result:
    name: str
    how: str  # what exactly ran
    status: str = "ok"  # "ok" | "failed" | "not available"
    note: str = ""
    prefill_ms: list[float] = field(default_factory=list)  # one per round
    decode_tok_s: list[float] = field(default_factory=list)  # one per round
    tokens: list[int] = field(default_factory=list)  # greedy tokens: the prefill's, then one per decode step
    export_s: float | None = None  # building its artifact (export / optimize)
    load_s: float | None = None  # loading it to run
    load_average: list[float] = field(default_factory=list)  # 1-minute load average at its first and last run


# --- helpers --------------------------------------------------------------------------------------

def rss_gb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {message}", flush=True)


@contextlib.contextmanager
def quiet():
    """The exporters and loaders print pages of warnings that say nothing about speed."""
    import logging

    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)


def ort_options(threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return options


def failure(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if exc.__cause__ is not None:
        text += f" (caused by {type(exc.__cause__).__name__}: {exc.__cause__})"
    return text


def in_subprocess(function: Callable, *args):
    """``function(*args)`` in a fresh process, so the memory it took is given back when it returns."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


# --- the decode floor -----------------------------------------------------------------------------

class MatMulReadRate:
    """Bytes/s at which ONNX Runtime streams a large fp32 MatMul weight: [1, K] x [K, N]."""

    def __init__(self, threads: int):
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        k, n = FLOOR_SHAPE
        weight = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32)
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul_read_rate",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
            [numpy_helper.from_array(weight, "w")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        self.session = ort.InferenceSession(model.SerializeToString(), ort_options(threads),
                                            providers=["CPUExecutionProvider"])
        self.x = np.random.default_rng(1).standard_normal((1, k), dtype=np.float32)
        self.weight_bytes = k * n * 4
        for _ in range(5):
            self.session.run(None, {"x": self.x})

    def measure(self, runs: int = 15) -> dict:
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            self.session.run(None, {"x": self.x})
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        return {"median_ms": seconds * 1e3, "gb_per_s": self.weight_bytes / seconds / 1e9,
                "load": os.getloadavg()[0]}


def decode_weight_bytes(cfg) -> dict:
    """Bytes of fp32 weights one batch-1 decode step reads, by part."""
    d, f, e, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_experts_per_tok
    kv = cfg.num_key_value_heads * cfg.head_dim
    q = cfg.num_attention_heads * cfg.head_dim
    layers = cfg.num_hidden_layers
    parts = {
        "embedding row": d,
        "attention (q, k, v, o)": layers * (d * q + 2 * d * kv + q * d),
        "norms": layers * 2 * d + d,
        "router": layers * e * d,
        f"{k} routed experts": layers * k * 3 * d * f,
        "lm_head": cfg.vocab_size * d,
    }
    parts = {name: count * 4 for name, count in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


# --- building the artifacts (each in its own process) ---------------------------------------------

def build_moetrt(work: Path, threads: int) -> dict:
    """The model, its Hugging Face checkpoint, its canonical export and (when available) its optimized folder."""
    import moetrt
    from moetrt.export import onnx_from_torch

    torch.set_num_threads(threads)
    built: dict = {"peak_rss_gb": 0.0}
    model = moetrt.MoETransformer.from_config(moetrt.MoEConfig.from_name(PRESET)).eval()
    built["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    if not (work / "checkpoint" / "config.json").exists():
        moetrt.save_pretrained(model, work / "checkpoint")
    if not (work / "canonical" / "moetrt.json").exists():
        start = time.perf_counter()
        with quiet():
            onnx_from_torch(model, work / "canonical", progress=False)
        built["canonical_export_s"] = time.perf_counter() - start
        log(f"moetrt export {built['canonical_export_s']:.0f} s")
    del model
    try:
        from moetrt.optimize import optimize

        if not (work / "optimized" / "moetrt.json").exists():
            start = time.perf_counter()
            with quiet():
                optimize(work / "canonical", work / "optimized", target="ort-cpu", progress=False)
            built["optimized_export_s"] = time.perf_counter() - start
            log(f"moetrt optimize {built['optimized_export_s']:.0f} s")
    except Exception as exc:  # noqa: BLE001 (not written yet, or failing: recorded, the rest still runs)
        built["optimized_error"] = failure(exc)
        log(f"moetrt ORT optimized not available: {built['optimized_error']}")
    built["peak_rss_gb"] = peak_rss_gb()
    return built


def build_peer(work: Path, fusions: str | None, threads: int) -> dict:
    """transformers' own export of the checkpoint: prefill and decode graphs."""
    import transformers
    from transformers.exporters import OnnxConfig, OnnxExporter

    torch.set_num_threads(threads)
    built: dict = {}
    if not (work / "peer" / "export.json").exists():
        start = time.perf_counter()
        try:
            with quiet():
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    work / "checkpoint", dtype=torch.float32, attn_implementation="sdpa").eval()
                sample = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
                exported = OnnxExporter().export_for_generation(
                    model, {"input_ids": sample, "attention_mask": torch.ones_like(sample)},
                    OnnxConfig(dynamic=True, ort_fusions=fusions),
                )
                exported.save_pretrained(work / "peer")
            built["export_s"] = time.perf_counter() - start
            log(f"transformers exporter {built['export_s']:.0f} s")
        except Exception as exc:  # noqa: BLE001 (recorded with its message; the others still run)
            built["error"] = f"export_for_generation raised {failure(exc)}"
            log(f"{PEER} failed: {built['error']}")
    built["peak_rss_gb"] = peak_rss_gb()
    return built


# --- the contenders: each loads and returns a Run ---------------------------------------------------

def moetrt_run(source, prompt: list[int], steps: int, **options) -> Run:
    from moetrt.runtime import Session

    session = Session(source, **options)

    def run():
        out = session.generate([prompt], max_new_tokens=steps + 1, stop_tokens=())
        return out.prefill_seconds, out.decode_seconds, out.decode_steps, list(out.tokens[0])

    return run


def transformers_eager_run(model, prompt: list[int], steps: int) -> Run:
    ids = torch.tensor([prompt])  # [1, L]

    @torch.inference_mode()
    def run():
        begin = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
        prefill = time.perf_counter() - begin
        tokens = [int(token)]
        cache = out.cache
        begin = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=token, cache=cache, use_cache=True)
            cache = out.cache
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))
        return prefill, time.perf_counter() - begin, steps, tokens

    return run


def generate_tokens(model, prompt: list[int], steps: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps + 1,
                                   min_new_tokens=steps + 1, do_sample=False)
    return generated[0, len(prompt):].tolist()


def peer_run(folder: Path, prompt: list[int], steps: int, threads: int) -> Run:
    from transformers import DynamicCache
    from transformers.exporters import ExportedModel

    with quiet():
        exported = ExportedModel.from_pretrained(folder, device="cpu", session_options=ort_options(threads))
    prefill_runner, decode_runner = exported.runners["prefill"], exported.runners["decode"]
    ids = torch.tensor([prompt])  # [1, L]
    positions = torch.arange(len(prompt))[None]  # [1, L]

    def run():
        begin = time.perf_counter()
        out = prefill_runner(input_ids=ids, position_ids=positions, cache=DynamicCache(config=exported.config))
        token = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
        prefill = time.perf_counter() - begin
        tokens = [int(token)]
        cache = out.cache
        begin = time.perf_counter()
        for step in range(steps):
            position = torch.tensor([[len(prompt) + step]])  # [1, 1]
            out = decode_runner(input_ids=token, position_ids=position, cache=cache)
            cache = out.cache
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))
        return prefill, time.perf_counter() - begin, steps, tokens

    return run


def measure_group(names: list[str], work: Path, prompt: list[int], steps: int, repeat: int, threads: int) -> dict:
    """Load the named contenders together and run them round-robin; the floor's MatMul after every round."""
    torch.set_num_threads(threads)
    results = {name: Result(name, "") for name in names}
    runs: dict[Result, Run] = {}
    extra: dict = {}
    hf_model = None
    for name in names:
        result = results[name]
        start = time.perf_counter()
        if name == "moetrt torch":
            import moetrt

            with quiet():
                model = moetrt.MoETransformer.from_config(moetrt.MoEConfig.from_name(PRESET))
            runs[result] = moetrt_run(model, prompt, steps, backend="torch")
            del model
        elif name == "transformers eager":
            import transformers

            with quiet():
                hf_model = transformers.AutoModelForCausalLM.from_pretrained(
                    work / "checkpoint", dtype=torch.float32, attn_implementation="sdpa").eval()
            extra["experts_implementation"] = hf_model.config._experts_implementation
            runs[result] = transformers_eager_run(hf_model, prompt, steps)
        elif name == PEER:
            runs[result] = peer_run(work / "peer", prompt, steps, threads)
        else:
            folder = work / ("canonical" if name == "moetrt ORT canonical" else "optimized")
            runs[result] = moetrt_run(folder, prompt, steps, backend="ort", session_options=ort_options(threads))
        result.load_s = time.perf_counter() - start
    matmul = MatMulReadRate(threads)
    log(f"{', '.join(names)}: loaded ({rss_gb():.1f} GB resident)")

    order = list(runs)
    for result in order:  # warm-up
        _, _, _, result.tokens = runs[result]()
        result.load_average.append(os.getloadavg()[0])
    floor_samples = []
    for round_ in range(repeat):
        for result in order[round_ % len(order):] + order[: round_ % len(order)]:
            prefill, decode, steps_run, tokens = runs[result]()
            result.prefill_ms.append(prefill * 1e3)
            result.decode_tok_s.append(steps_run / decode)
            if tokens != result.tokens:
                raise AssertionError(f"{result.name}: greedy tokens changed between runs")
        floor_samples.append(matmul.measure())
    for result in order:
        result.load_average.append(os.getloadavg()[0])
        log(f"{result.name}: prefill {statistics.median(result.prefill_ms):.1f} ms, "
            f"decode {statistics.median(result.decode_tok_s):.1f} tok/s (medians)")
    if hf_model is not None:
        extra["generate_tokens"] = generate_tokens(hf_model, prompt, steps)
    return {"results": [asdict(r) for r in results.values()], "floor_samples": floor_samples,
            "peak_rss_gb": peak_rss_gb(), **extra}


# --- report -----------------------------------------------------------------------------------------

def machine_info(threads: int | None = None) -> dict:
    """Platform, CPU model, cores, intra-op threads (when given) and memory: every benchmark records these."""
    cpu = memory = ""
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    with contextlib.suppress(OSError, StopIteration):
        kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
        memory = f"{kib / 2**20:.1f} GiB"
    info = {"platform": platform.platform(), "cpu": cpu or platform.processor(), "cores": os.cpu_count(),
            "threads": threads, "memory": memory}
    return {key: value for key, value in info.items() if value is not None}


def versions() -> dict:
    import onnx
    import onnxruntime
    import onnxscript
    import transformers

    import moetrt

    def git(*args: str) -> str:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, check=True).stdout.strip()

    commit = ""
    with contextlib.suppress(Exception):
        commit = git("rev-parse", "--short", "HEAD")
        if git("status", "--porcelain", "--", "moetrt", "export", "optimize", "runtime"):
            commit += " + uncommitted changes"
    return {"python": sys.version.split()[0], "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "transformers": transformers.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "moetrt": moetrt.__version__, "moetrt_commit": commit}


def named_work(argv: list[str]) -> list[str]:
    """Command-line arguments with the work folder written as DIR: a result names no folder of the machine it ran on."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--work" and i + 1 < len(out):
            out[i + 1] = "DIR"
        elif arg.startswith("--work="):
            out[i] = "--work=DIR"
    return out


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def summarize(result: Result, peer: Result, floor_tok_s: list[float], same_group: bool) -> dict:
    """Medians, bests, and ratios to the peer and the floor (round by round where measured side by side)."""
    row = asdict(result)
    ok = result.status == "ok" and result.prefill_ms
    row["prefill_ms_median"] = median(result.prefill_ms) if ok else None
    row["prefill_ms_best"] = min(result.prefill_ms) if ok else None
    row["decode_tok_s_median"] = median(result.decode_tok_s) if ok else None
    row["decode_tok_s_best"] = max(result.decode_tok_s) if ok else None
    row["decode_vs_floor"] = median(d / f for d, f in zip(result.decode_tok_s, floor_tok_s)) if ok else None
    row["ratios"] = "-"
    row["prefill_speedup_vs_peer"] = row["decode_vs_peer"] = None
    if ok and peer.status == "ok" and peer.prefill_ms:
        if same_group:
            row["ratios"] = "round by round"
            row["prefill_speedup_vs_peer"] = median(p / r for p, r in zip(peer.prefill_ms, result.prefill_ms))
            row["decode_vs_peer"] = median(r / p for r, p in zip(result.decode_tok_s, peer.decode_tok_s))
        else:
            row["ratios"] = "of medians, across groups"
            row["prefill_speedup_vs_peer"] = median(peer.prefill_ms) / row["prefill_ms_median"]
            row["decode_vs_peer"] = row["decode_tok_s_median"] / median(peer.decode_tok_s)
    return row


def write_report(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "runtime_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    m, v, floor, rows = report["machine"], report["versions"], report["floor"], report["results"]
    loads = report["load"]
    lines = [
        "# Runtime on the CPU: bench-small, prefill 1x256 and greedy decode, fp32",
        "",
        (f"{report['date']}. {m['cpu']}, {m['cores']} cores, {m['threads']} threads for every contender, "
         f"{m['memory']}, {m['platform']}."),
        (f"Python {v['python']}, torch {v['torch']}, onnxruntime {v['onnxruntime']}, transformers "
         f"{v['transformers']}, onnx {v['onnx']}, onnxscript {v['onnxscript']}, moetrt {v['moetrt']} "
         f"({v['moetrt_commit']})."),
        (f"Prompt {report['prompt_tokens']} tokens, then {report['decode_steps']} greedy decode steps; one warm-up "
         f"and {report['repeat']} rounds. Command: `{report['command']}` ({report['wall_seconds'] / 60:.1f} min, "
         f"peak memory {report['peak_rss_gb']:.1f} GB)."),
        (f"Load average (1 min): {loads['before']:.2f} before the run, {loads['after']:.2f} after; at each "
         "contender's first and last run in the last column. The machine is shared with other jobs: a 2-thread "
         "contender that loses a core to one runs several times slower, so medians move with the load; the best "
         "run shows the machine undisturbed, and ratios are taken round by round."),
        "",
        ("| contender | prefill ms: median (best) | decode tok/s: median (best) | prefill vs peer | decode vs peer "
         "| decode vs floor | same tokens as eager | load average |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['name']} | {row['status']} | | | | | | |")
            continue
        mark = " †" if row["ratios"] == "of medians, across groups" else ""
        load = " -> ".join(f"{x:.2f}" for x in row["load_average"])
        lines.append(
            f"| {row['name']} | {row['prefill_ms_median']:.1f} ({row['prefill_ms_best']:.1f}) | "
            f"{row['decode_tok_s_median']:.1f} ({row['decode_tok_s_best']:.1f}) | "
            f"{fmt(row['prefill_speedup_vs_peer'], '.2f', 'x')}{mark} | {fmt(row['decode_vs_peer'], '.2f', 'x')}{mark} | "
            f"{fmt(row['decode_vs_floor'], '.0%')} | "
            f"{row['tokens_match_eager']} | {load} |"
        )
    lines.append(f"| decode floor | | {floor['tok_s']:.1f} ({floor['tok_s_best']:.1f}) | | | 100% | | |")
    parts = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in floor["bytes_per_token"].items() if name != "total")
    lines += [
        "",
        ("*prefill vs peer*: the peer's prefill time over this one (above 1: faster than the peer); *decode vs peer*: "
         "tokens/s over the peer's; both the median over rounds of the ratio within a round, except † (the PyTorch "
         "pair ran in its own group: ratio of medians). *decode vs floor*: median over rounds of tokens/s over the "
         "floor measured after that round."),
        "",
        (f"**Decode floor**: {floor['bytes_per_token']['total'] / 1e6:.1f} MB of fp32 weights per token ({parts}) "
         f"at {floor['gb_per_s']:.1f} GB/s = {floor['ms_per_token']:.2f} ms/token = {floor['tok_s']:.1f} tok/s "
         f"(median over all rounds; the best round read {floor['gb_per_s_best']:.1f} GB/s = "
         f"{floor['tok_s_best']:.1f} tok/s). Read rate: ONNX Runtime MatMul [1, {FLOOR_SHAPE[0]}] x "
         f"{list(FLOOR_SHAPE)} fp32, weight bytes over the median of 15 runs, after every round."),
        "",
        (f"**Targets** (issue 4): fp32 decode >= the peer's tokens/s, prefill >= {TARGETS['prefill_vs_peer']}x the "
         "peer's speed."),
    ]
    for row in rows:
        if row["name"].startswith("moetrt") and row["status"] == "ok":
            decode_ok = (row["decode_vs_peer"] or 0) >= TARGETS["decode_vs_peer"]
            prefill_ok = (row["prefill_speedup_vs_peer"] or 0) >= TARGETS["prefill_vs_peer"]
            lines.append(
                f"- {row['name']}: decode {fmt(row['decode_vs_peer'], '.2f', 'x')} the peer's "
                f"({'met' if decode_ok else 'not met'}), prefill {fmt(row['prefill_speedup_vs_peer'], '.2f', 'x')} "
                f"({'met' if prefill_ok else 'not met'})."
            )
    lines += ["", "**What ran**", ""]
    for row in rows:
        text = f"- {row['name']}: {row['how']}"
        timing = [f"{what} {row[key]:.0f} s" for what, key in (("export", "export_s"), ("load", "load_s"))
                  if row[key] is not None]
        if timing:
            text += f" ({', '.join(timing)})"
        if row["note"]:
            text += f". {'Note' if row['status'] == 'ok' else row['status'].capitalize()}: {row['note']}"
        lines.append(text)
    lines += ["", "Every round's samples, the greedy tokens and the floor's samples are in `runtime_cpu.json`."]
    (out / "runtime_cpu.md").write_text("\n".join(lines) + "\n")


# --- main ---------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=10, help="rounds after the warm-up")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=32, help="single-token decode steps after the prefill")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--peer-fusions", choices=["cpu", "none"], default="cpu",
                        help="OnnxConfig(ort_fusions=...) of the transformers exporter (default cpu)")
    parser.add_argument("--work", type=Path, default=None, help="keep artifacts here and reuse them (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    import moetrt

    started, load_before = time.perf_counter(), os.getloadavg()[0]
    log(f"{PRESET}, prompt {args.prompt_tokens}, {args.decode_tokens} decode steps, {args.repeat} rounds, "
        f"{args.threads} threads")
    work = args.work or Path(tempfile.mkdtemp(prefix="moetrt-bench-runtime-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = moetrt.MoEConfig.from_name(PRESET)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, args.prompt_tokens).tolist()
    fusions = None if args.peer_fusions == "none" else args.peer_fusions
    peaks = {}
    try:
        built = in_subprocess(build_moetrt, work, args.threads)
        peer_built = in_subprocess(build_peer, work, fusions, args.threads)
        peaks["build"] = max(built["peak_rss_gb"], peer_built["peak_rss_gb"])
        ort_group = [n for n in ORT_GROUP if (n != PEER or "error" not in peer_built)
                     and (n != "moetrt ORT optimized" or "optimized_error" not in built)]
        torch_measured = in_subprocess(measure_group, TORCH_GROUP, work, prompt, args.decode_tokens, args.repeat,
                                       args.threads)
        ort_measured = in_subprocess(measure_group, ort_group, work, prompt, args.decode_tokens, args.repeat,
                                     args.threads)
        peaks["torch group"], peaks["ONNX Runtime group"] = torch_measured["peak_rss_gb"], ort_measured["peak_rss_gb"]
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    # --- assemble --------------------------------------------------------------------------------
    results = {name: Result(name, HOW[name].format(fusions=fusions)) for name in CONTENDERS}
    for measured in (torch_measured, ort_measured):
        for data in measured["results"]:
            result = results[data["name"]]
            for key, value in data.items():
                if key not in ("name", "how"):
                    setattr(result, key, value)
    results["moetrt ORT canonical"].export_s = built.get("canonical_export_s")
    results["moetrt ORT optimized"].export_s = built.get("optimized_export_s")
    if "optimized_error" in built:
        results["moetrt ORT optimized"].status = "not available"
        results["moetrt ORT optimized"].note = built["optimized_error"]
    results[PEER].export_s = peer_built.get("export_s")
    if "error" in peer_built:
        results[PEER].status, results[PEER].note = "failed", peer_built["error"]
    eager = results["transformers eager"]
    eager.how += f"; experts implementation {torch_measured.get('experts_implementation')!r}"
    if torch_measured.get("generate_tokens") != eager.tokens:
        eager.note = f"the manual loop's tokens differ from model.generate's ({torch_measured.get('generate_tokens')})"

    bytes_per_token = decode_weight_bytes(cfg)
    samples = {"torch group": torch_measured["floor_samples"], "ONNX Runtime group": ort_measured["floor_samples"]}
    rates = [s["gb_per_s"] for group in samples.values() for s in group]
    gb_per_s, best = statistics.median(rates), max(rates)
    floor = {"bytes_per_token": bytes_per_token, "gb_per_s": gb_per_s, "gb_per_s_best": best,
             "ms_per_token": bytes_per_token["total"] / gb_per_s / 1e6, "tok_s": gb_per_s * 1e9 / bytes_per_token["total"],
             "tok_s_best": best * 1e9 / bytes_per_token["total"], "matmul_shape": [1, *FLOOR_SHAPE], "samples": samples}
    floor_tok_s = {group: [s["gb_per_s"] * 1e9 / bytes_per_token["total"] for s in group_samples]
                   for group, group_samples in samples.items()}

    rows = []
    for name in CONTENDERS:
        group = "torch group" if name in TORCH_GROUP else "ONNX Runtime group"
        row = summarize(results[name], results[PEER], floor_tok_s[group], same_group=name in ORT_GROUP)
        row["tokens_match_eager"] = "-"
        if results[name].tokens and eager.tokens:
            first = next((i for i, (a, b) in enumerate(zip(results[name].tokens, eager.tokens)) if a != b), None)
            row["tokens_match_eager"] = "yes" if first is None else f"no (from token {first})"
        rows.append(row)

    report = {
        "benchmark": "runtime on the CPU: bench-small, prefill 1xL and greedy decode, fp32",
        "command": " ".join(["python benchmarks/bench_runtime_cpu.py", *named_work(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "preset": PRESET,
        "config": cfg.to_dict(),
        "weight_bytes": built["weight_bytes"],
        "prompt_tokens": args.prompt_tokens,
        "decode_steps": args.decode_tokens,
        "repeat": args.repeat,
        "machine": machine_info(args.threads),
        "versions": versions(),
        "load": {"before": load_before, "after": os.getloadavg()[0]},
        "wall_seconds": time.perf_counter() - started,
        "peak_rss_gb": max(peaks.values()),
        "peak_rss_gb_by_phase": peaks,
        "floor": floor,
        "targets": TARGETS,
        "results": rows,
    }
    write_report(args.out, report)
    log(f"wrote {args.out / 'runtime_cpu.md'} ({report['wall_seconds']:.0f} s)")
    print((args.out / "runtime_cpu.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
