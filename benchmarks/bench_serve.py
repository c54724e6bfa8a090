"""What batching buys the server: bench-small on ONNX Runtime (CPU), 1 / 4 / 16 concurrent clients.

Two ``moetrt serve`` processes on 127.0.0.1 serve the same export of the ``bench-small`` preset
(random weights seeded 0: d 1024, 4 layers, 8 experts of ffn 3584, top-2; built as
``bench_runtime_cpu.py`` builds it): one with ``--max-batch 1`` (one request at a time, the
baseline) and one with the default continuous batching (``--max-batch 16``). Each client sends
``--requests`` streaming completions one after another (a prompt of ``--prompt-len`` random token
ids, ``max_tokens`` ``--max-tokens``, greedy) through ``/v1/completions`` with ``stream: true``.

Measured per (server, clients): throughput = completion tokens of every request / wall time from
the first request sent to the last answer; time to first token (TTFT) = request sent -> first
streamed chunk, p50 and p95 over the requests. The two servers run in turn for each client count,
``--rounds`` times; the table gives medians over rounds and the ratio batched / one-at-a-time of
each round's throughputs (median). Both servers give the same tokens (greedy, same prompts), so
the token counts match; that is checked.

    python benchmarks/bench_serve.py --work /tmp/bench-serve          # writes benchmarks/results/serve.{md,json}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtime_cpu import PRESET, build_moetrt, log, machine_info, named_work, versions  # noqa: E402  (one bench-small build)

HERE = Path(__file__).resolve().parent
MODES = {"one at a time": 1, "batching": 16}  # name -> --max-batch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``moetrt serve FOLDER --backend ort`` in its own process on 127.0.0.1."""

    def __init__(self, folder: Path, max_batch: int, threads: int, log_file: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.log = open(log_file, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moetrt.cli", "serve", str(folder), "--backend", "ort", "--port", str(self.port),
             "--model-name", "bench-small", "--max-batch", str(max_batch)],
            stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )

    def wait_ready(self, timeout: float = 300.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the server did not answer /health in {timeout:.0f} s")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


async def one_request(client, url: str, prompt: list[int], max_tokens: int) -> tuple[float, int, float]:
    """(seconds to the first chunk, completion tokens, seconds in all) of one streamed completion."""
    body = {"model": "bench-small", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, tokens = None, None
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                raise RuntimeError(data["error"]["message"])
            if first is None and data["choices"]:
                first = time.perf_counter() - start
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
    assert first is not None and tokens is not None
    return first, tokens, time.perf_counter() - start


async def load(url: str, clients: int, requests: int, prompts: list[list[int]], max_tokens: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def client_loop(c: int) -> list[tuple[float, int, float]]:
            return [await one_request(client, url, prompts[(c * requests + r) % len(prompts)], max_tokens)
                    for r in range(requests)]

        start = time.perf_counter()
        results = await asyncio.gather(*(client_loop(c) for c in range(clients)))
        wall = time.perf_counter() - start
    flat = [r for rs in results for r in rs]
    ttft = [r[0] for r in flat]
    tokens = sum(r[1] for r in flat)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p95_s": float(np.percentile(ttft, 95)),
            "requests": len(flat)}


def write_report(out: Path, report: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    m, v, a = report["machine"], report["versions"], report["args"]
    lines = [
        "# Serving: one request at a time vs continuous batching (bench-small, ONNX Runtime CPU, fp32)",
        "",
        f"`{report['command']}`, {report['date']}. {m['cpu']}, {m['cores']} cores ({report['load_note']}), "
        f"{m['memory']}, {m['platform']}.",
        "",
        f"Each client sends {a['requests']} streamed completions one after another: {a['prompt_len']} random prompt "
        f"tokens, max_tokens {a['max_tokens']}, greedy. Two `moetrt serve --backend ort` processes (--max-batch 1 and "
        f"16) serve the same export; they run in turn for each client count, {a['rounds']} rounds. Medians over rounds; "
        "the ratio is the median of each round's batching / one-at-a-time throughput. TTFT: request sent -> first "
        "streamed chunk.",
        "",
        "| clients | server | tokens/s | TTFT p50 (s) | TTFT p95 (s) | batching / one at a time |",
        "|---|---|---|---|---|---|",
    ]
    for clients, rows in report["results"].items():
        for mode in MODES:
            r = rows[mode]
            ratio = f"**{rows['ratio']:.2f}x**" if mode == "batching" else ""
            lines.append(f"| {clients} | {mode} | {r['tokens_per_s']:.1f} | {r['ttft_p50_s']:.2f} | "
                         f"{r['ttft_p95_s']:.2f} | {ratio} |")
    lines += [
        "",
        f"Versions: {', '.join(f'{k} {val}' for k, val in v.items() if val)}.",
        "",
        f"The machine is shared with other jobs ({report['load_note']}: 1-minute load average "
        f"{report['load_average'][0]:.1f}-{report['load_average'][1]:.1f} on {m['cores']} cores while this ran), so the "
        "absolute numbers are far below an idle machine's (`runtime_cpu.md` measured 93 tok/s single-stream decode on "
        "this model) and move between runs; the ratios compare the two servers measured in turn within the same minutes.",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/moetrt-bench"), help="where bench-small is exported")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="ONNX Runtime threads per server")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "serve")
    parser.add_argument("--load-note", default="2 shared cores under load", help="how busy the machine was")
    args = parser.parse_args(argv)

    args.work.mkdir(parents=True, exist_ok=True)
    build_moetrt(args.work, args.threads)
    folder = args.work / "canonical"
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 32000, args.prompt_len).tolist() for _ in range(64)]

    servers = {mode: Server(folder, batch, args.threads, args.work / f"serve-{batch}.log") for mode, batch in MODES.items()}
    try:
        for server in servers.values():
            server.wait_ready()
        log("servers ready")
        for server in servers.values():  # warm-up: one request each
            asyncio.run(load(server.url, 1, 1, prompts, 4))
        runs: dict[int, dict[str, list[dict]]] = {c: {mode: [] for mode in MODES} for c in args.clients}
        for round_ in range(args.rounds):
            for clients in args.clients:
                for mode, server in servers.items():
                    result = asyncio.run(load(server.url, clients, args.requests, prompts, args.max_tokens))
                    result["load_average"] = os.getloadavg()[0]
                    runs[clients][mode].append(result)
                    log(f"round {round_}, {clients} clients, {mode}: {result['tokens_per_s']:.1f} tok/s, "
                        f"TTFT p50 {result['ttft_p50_s']:.2f} s")
    finally:
        for server in servers.values():
            server.stop()

    loads = [r["load_average"] for by_mode in runs.values() for rs in by_mode.values() for r in rs]
    results = {}
    for clients, by_mode in runs.items():
        counts = {r["tokens"] for rs in by_mode.values() for r in rs}
        assert len(counts) == 1, f"the servers gave different token counts at {clients} clients: {counts}"
        row = {mode: {key: statistics.median(r[key] for r in rs) for key in rs[0] if key != "load_average"}
               for mode, rs in by_mode.items()}
        row["ratio"] = statistics.median(b["tokens_per_s"] / o["tokens_per_s"]
                                         for b, o in zip(by_mode["batching"], by_mode["one at a time"]))
        results[str(clients)] = row
    report = {
        "benchmark": "serving: one request at a time vs continuous batching, bench-small, ONNX Runtime CPU",
        "command": " ".join(["python benchmarks/bench_serve.py", *named_work(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "preset": PRESET,
        "machine": machine_info(args.threads),
        "versions": versions(),
        "load_note": args.load_note,
        "load_average": [min(loads), max(loads)],
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
        "runs": {str(c): r for c, r in runs.items()},
    }
    write_report(args.out, report)
    log(f"wrote {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
