"""Per-step decode time of moetrt's runtime loop against onnxruntime-genai's, on the same exported folder.

The trained ``tiny`` preset (2.7 M parameters) is exported once; ``Session(folder, backend="ort")``
and onnxruntime-genai (``og.Model`` on the same folder, through the ``genai_config.json`` the export
writes) run the same prompt greedily at 1 and 2 intra-op threads. On a model this small one ONNX
Runtime run takes about a millisecond, so the Python work around it shows.

A step's time is whole-loop: ``(generate N tokens) - (generate 1 token)``, divided by ``N - 1``,
so it holds the model run, sampling, the loop's bookkeeping and everything the API does per
token, for both contenders alike. genai stops at the model's eos token and has no switch to go
on, so its eos id is set (by a config overlay, the folder is unchanged) to a token the greedy
continuation never produces; Session runs with ``stop_tokens=()``; both then produce the same
``N`` tokens, which the benchmark checks.

Session's step is also split into the ONNX Runtime run (timed around ``run_with_iobinding``) and
the rest (Python: binding feeds, sampling, the loop), the part this benchmark is about. A third
contender, the bare loop, is the least Python a greedy loop over ``InferenceSession.run`` can be
(NumPy feeds, presents fed back, argmax): what ONNX Runtime's Python API costs before any runtime
of ours. CPU time of the process per step is reported beside the wall time: with one intra-op
thread it is the work itself, and moves much less than wall time with the load of other jobs.

Rounds rotate the order of the contenders (A B C, B C A, ...); reported are medians over rounds
and the median of the within-round ratios to genai (above 1: slower than genai).

    python benchmarks/bench_runtime_overhead.py [--repeat 15] [--tokens 128] [--out benchmarks/results]

Writes ``runtime_overhead.json`` and ``runtime_overhead.md``.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_runtime_cpu as peer_bench  # noqa: E402 (machine and version records, shared by the benchmarks)

TARGET = 1.2  # Session's per-step time at most this many times genai's, at equal threads


class _TimedRuns:
    """Stands in for ``InferenceSession._sess``: times each ``run_with_iobinding``, passes the rest through."""

    def __init__(self, inner):
        self._inner, self.seconds, self.runs = inner, 0.0, 0

    def run_with_iobinding(self, *args):
        start = time.perf_counter()
        result = self._inner.run_with_iobinding(*args)
        self.seconds += time.perf_counter() - start
        self.runs += 1
        return result

    def __getattr__(self, name):
        return getattr(self._inner, name)


def session_contender(folder: Path, threads: int, prompt: list[int]):
    import onnxruntime as ort

    from moetrt.runtime import Session

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    session = Session(folder, backend="ort", session_options=options)
    timer = _TimedRuns(session.backend.session._sess)
    session.backend.session._sess = timer

    def run(tokens: int) -> tuple[float, float, float, list[int]]:
        """(wall seconds, CPU seconds of the process, wall seconds inside ONNX Runtime, tokens)."""
        timer.seconds = 0.0
        start, cpu = time.perf_counter(), time.process_time()
        out = session.generate([prompt], max_new_tokens=tokens, stop_tokens=())
        return time.perf_counter() - start, time.process_time() - cpu, timer.seconds, out.tokens[0]

    return run


def bare_contender(folder: Path, threads: int, prompt: list[int]):
    """The least Python a greedy loop over ``InferenceSession.run`` can do: NumPy feeds, presents fed back."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    pairs = [(names.index(i.name.replace("past_key_values.", "present.")), i.name) for i in pasts]

    def run(tokens: int) -> tuple[float, float, float, list[int]]:
        start, cpu = time.perf_counter(), time.process_time()
        ids = np.array([prompt], np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(len(prompt))[None]}
        feeds.update({i.name: np.zeros([1, i.shape[1], 0, i.shape[3]], np.float32) for i in pasts})
        out = []
        for step in range(tokens):
            values = session.run(names, feeds)
            out.append(int(values[0][0, -1].argmax()))
            if step == tokens - 1:
                break
            total = len(prompt) + step + 1
            feeds = {"input_ids": np.array([[out[-1]]]), "attention_mask": np.ones((1, total), np.int64),
                     "position_ids": np.array([[total - 1]])}
            feeds.update({past: values[index] for index, past in pairs})
        return time.perf_counter() - start, time.process_time() - cpu, float("nan"), out

    return run


def genai_contender(folder: Path, threads: int, prompt: list[int], never: int):
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"eos_token_id": never, "pad_token_id": never, "decoder": {
        "session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)

    def run(tokens: int) -> tuple[float, float, float, list[int]]:
        start, cpu = time.perf_counter(), time.process_time()
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + tokens, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)
        out = []
        while not generator.is_done():
            generator.generate_next_token()
            out.append(int(generator.get_next_tokens()[0]))
        return time.perf_counter() - start, time.process_time() - cpu, float("nan"), out

    return run


PROFILE_TOKENS = 32  # decode steps profiled per contender (ONNX Runtime's profile: ~0.5 MB a step on tiny)


def _run_spans(path: Path) -> dict:
    """Median per decode step of an ONNX Runtime profile: inside ``model_run``, its kernels, and between runs."""
    text = path.read_text().rstrip()
    if not text.endswith("]"):  # genai ends its profile when its session goes, which a live process may not see
        text = text.rstrip(",") + "]"
    events = json.loads(text)
    path.unlink()
    runs = sorted((e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"), key=lambda e: e["ts"])
    starts = [r["ts"] for r in runs]
    kernel = [0.0] * len(runs)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            i = bisect.bisect_right(starts, e["ts"]) - 1
            if i >= 0 and e["ts"] <= runs[i]["ts"] + runs[i]["dur"]:
                kernel[i] += e["dur"]
    steps = range(2, len(runs))  # after the prefill and the first decode step
    return {"runs": len(runs), "model_run_us": statistics.median(runs[i]["dur"] for i in steps),
            "kernel_us": statistics.median(kernel[i] for i in steps),
            "between_runs_us": statistics.median(runs[i]["ts"] - runs[i - 1]["ts"] - runs[i - 1]["dur"] for i in steps)}


def profile_split(folder: Path, threads: int, prompt: list[int], never: int, work: Path) -> dict:
    """Where a step's time lies for Session and genai, from ONNX Runtime's own profile of each: inside its run
    of the graph (``model_run``, kernels included) or between two runs (the caller's loop and the API's
    entry and exit). Profiling slows both alike; the split, not the sum, is the point."""
    import onnxruntime as ort
    import onnxruntime_genai as og

    from moetrt.runtime import Session

    split = {}
    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"eos_token_id": never, "pad_token_id": never, "decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1, "enable_profiling": str(work / "genai")}}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + PROFILE_TOKENS, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    del generator, params, model
    split["genai"] = _run_spans(max(work.glob("genai*.json"), key=os.path.getmtime))
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    options.enable_profiling, options.profile_file_prefix = True, str(work / "session")
    session = Session(folder, backend="ort", session_options=options)
    session.generate([prompt], max_new_tokens=PROFILE_TOKENS, stop_tokens=())
    split["session"] = _run_spans(Path(session.backend.session.end_profiling()))
    return split


def measure(folder: Path, threads_list: list[int], prompt_len: int, tokens: int, repeat: int, work: Path) -> dict:
    import moetrt

    cfg = moetrt.MoEConfig.from_dict(json.loads((folder / "moetrt.json").read_text())["config"])
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, prompt_len).tolist()
    result = {}
    for threads in threads_list:
        session = session_contender(folder, threads, prompt)
        expected = session(tokens)[-1]
        never = min(set(range(cfg.vocab_size)) - set(expected))
        genai = genai_contender(folder, threads, prompt, never)
        got = genai(tokens)[-1]
        bare = bare_contender(folder, threads, prompt)
        got_bare = bare(tokens)[-1]
        per_step = {"session": [], "genai": [], "bare": []}
        cpu_step = {"session": [], "genai": [], "bare": []}
        ort_share = []
        order = [("session", session), ("genai", genai), ("bare", bare)]
        for round_ in range(repeat):
            for name, run in order[round_ % 3:] + order[: round_ % 3]:
                one, one_cpu, one_ort, _ = run(1)
                full, full_cpu, full_ort, _ = run(tokens)
                per_step[name].append((full - one) / (tokens - 1))
                cpu_step[name].append((full_cpu - one_cpu) / (tokens - 1))
                if name == "session":
                    ort_share.append((full_ort - one_ort) / (tokens - 1))
            peer_bench.log(f"{threads} thread(s), round {round_ + 1}: session "
                           f"{per_step['session'][-1] * 1e6:.0f} us, genai {per_step['genai'][-1] * 1e6:.0f} us, "
                           f"bare loop {per_step['bare'][-1] * 1e6:.0f} us")
        ratios = [s / g for s, g in zip(per_step["session"], per_step["genai"])]
        python = [s - o for s, o in zip(per_step["session"], ort_share)]
        result[threads] = {
            "session_us": statistics.median(per_step["session"]) * 1e6,
            "genai_us": statistics.median(per_step["genai"]) * 1e6,
            "ratio": statistics.median(ratios),
            "cpu_ratio": statistics.median(s / g for s, g in zip(cpu_step["session"], cpu_step["genai"])),
            "session_cpu_us": statistics.median(cpu_step["session"]) * 1e6,
            "genai_cpu_us": statistics.median(cpu_step["genai"]) * 1e6,
            "bare_us": statistics.median(per_step["bare"]) * 1e6,
            "bare_cpu_us": statistics.median(cpu_step["bare"]) * 1e6,
            "bare_ratio": statistics.median(b / g for b, g in zip(per_step["bare"], per_step["genai"])),
            "session_vs_bare": statistics.median(s / b for s, b in zip(per_step["session"], per_step["bare"])),
            "session_ort_run_us": statistics.median(ort_share) * 1e6,
            "session_python_us": statistics.median(python) * 1e6,
            "session_us_runs": [x * 1e6 for x in per_step["session"]],
            "genai_us_runs": [x * 1e6 for x in per_step["genai"]],
            "same_tokens": got == expected == got_bare, "tokens": len(expected),
            "profile": profile_split(folder, threads, prompt, never, work),
        }
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=15, help="rounds per thread count")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per timed generation")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens (batch 1)")
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--work", type=Path, default=None, help="keep the exported folder here (reused)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    import onnxruntime_genai as og

    import moetrt
    from moetrt.export import onnx_from_torch

    started, load_before = time.perf_counter(), os.getloadavg()
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory()
        args.work = Path(tmp.name)
    folder = args.work / "tiny"
    if not (folder / "moetrt.json").exists():
        with peer_bench.quiet():
            onnx_from_torch(moetrt.from_pretrained("tiny"), folder, progress=False)
    rows = measure(folder, args.threads, args.prompt, args.tokens, args.repeat, args.work)
    result = {
        "benchmark": "per-step decode time: Session (ort back end) vs onnxruntime-genai on the same exported tiny",
        "command": " ".join(["python benchmarks/bench_runtime_overhead.py", *peer_bench.named_work(sys.argv[1:] if argv is None else argv)]),
        "workload": {"batch": 1, "prompt": args.prompt, "tokens": args.tokens, "repeat": args.repeat},
        "machine": peer_bench.machine_info(), "versions": {**peer_bench.versions(), "onnxruntime_genai": og.__version__},
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "wall_seconds": time.perf_counter() - started, "target": TARGET,
        "rows": {str(k): v for k, v in rows.items()}, "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runtime_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    write_report(args.out / "runtime_overhead.md", result)
    if tmp is not None:
        tmp.cleanup()
    print((args.out / "runtime_overhead.md").read_text())
    return 0


def write_report(path: Path, result: dict) -> None:
    m, v, w, loads = result["machine"], result["versions"], result["workload"], result["load_average"]
    lines = [
        "# Runtime loop overhead: Session (ort back end) against onnxruntime-genai, trained `tiny`",
        "",
        (f"{result['date']}. {m['cpu']}, 2 shared cores under load, {m['memory']}, {m['platform']}. "
         f"Python {v['python']}, onnxruntime {v['onnxruntime']}, onnxruntime-genai {v['onnxruntime_genai']}, "
         f"torch {v['torch']}, moetrt {v['moetrt']} ({v['moetrt_commit']})."),
        (f"Batch 1, a {w['prompt']}-token prompt, {w['tokens']} greedy tokens; a step is "
         f"(time to generate {w['tokens']} tokens - time to generate 1) / {w['tokens'] - 1}, whole-loop on both sides. "
         f"{w['repeat']} rounds per thread count, the order rotating round by round. Command: `{result['command']}` "
         f"({result['wall_seconds'] / 60:.1f} min). Load average (1/5/15 min): "
         f"{' / '.join(f'{x:.2f}' for x in loads['before'])} before, {' / '.join(f'{x:.2f}' for x in loads['after'])} after."),
        "",
        ("| intra-op threads | Session us/step (CPU us) | genai us/step (CPU us) | bare loop us/step (CPU us) "
         "| Session / genai: wall (CPU) | bare loop / genai | Session / bare loop | Session's ONNX Runtime run us/step "
         "| Session's rest us/step | same greedy tokens |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for threads, row in result["rows"].items():
        lines.append(f"| {threads} | {row['session_us']:.0f} ({row['session_cpu_us']:.0f}) | {row['genai_us']:.0f} "
                     f"({row['genai_cpu_us']:.0f}) | {row['bare_us']:.0f} ({row['bare_cpu_us']:.0f}) | "
                     f"{row['ratio']:.2f}x ({row['cpu_ratio']:.2f}x) | {row['bare_ratio']:.2f}x | "
                     f"{row['session_vs_bare']:.2f}x | {row['session_ort_run_us']:.0f} | {row['session_python_us']:.0f} | "
                     f"{'yes' if row['same_tokens'] else 'no'} ({row['tokens']}) |")
    lines += ["", f"**Target** (Session <= {result['target']}x genai's per-step time at equal threads): " + "; ".join(
        f"{t} thread(s) {row['ratio']:.2f}x ({'met' if row['ratio'] <= result['target'] else 'not met'})"
        for t, row in result["rows"].items()) + "."]
    lines += ["", f"## Inside ONNX Runtime's run and between runs (its profile, {PROFILE_TOKENS} decode steps each, medians)", "",
              ("Both contenders run the same graph through the same ONNX Runtime; its profile marks each run "
               "(`model_run`) and each kernel. What lies between two runs is the caller's: genai's C++ loop, or "
               "Session's Python (binding, sampling, bookkeeping) and the Python API's entry and exit. Profiling "
               "slows every kernel, so compare the columns across contenders, not with the table above."), "",
              "| intra-op threads | contender | inside model_run us | of which kernels us | between runs us |",
              "|---|---|---|---|---|"]
    for threads, row in result["rows"].items():
        for name in ("session", "genai"):
            p = row["profile"][name]
            lines.append(f"| {threads} | {'Session' if name == 'session' else 'genai'} | {p['model_run_us']:.0f} | "
                         f"{p['kernel_us']:.0f} | {p['between_runs_us']:.0f} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
