"""Quantized bench-small on ONNX Runtime CPU: prefill against the fp32 canonical export, decode against
its own bytes floor, and the per-op profiles that say where each one's time goes.

Every variant is ``moetrt optimize --target ort-cpu`` of one canonical bench-small export (random
weights seeded 0: d 1024, 4 layers, 8 experts of ffn 3584, top-2, vocab 32000), run by moetrt's
runtime (``Session(folder, backend="ort")``). One round runs every variant once (a 1 x ``--prompt``
prefill, then ``--decode-tokens`` greedy steps), the order rotating round by round, and then the
read rate of a large fp32 MatMul ([1, 4096] x [4096, 16384], ``bench_runtime_cpu.MatMulReadRate``).

- prefill vs canonical: median over rounds of canonical's prefill time over the variant's, both
  from the same round (above 1: the variant is faster).
- decode vs its floor: a batch-1 decode step must read the bytes of every weight it uses once
  (``bench_ort_optimize.decode_bytes_per_token``: the variant's own quantized weights and scales,
  K/E of the experts, one embedding row, the KV cache at the middle of decode); the floor is those
  bytes at the read rate measured right after the same round. Median over rounds of tok/s over
  the floor.
- weight-reading kernels alone: every node of a quantized variant's decode step that reads weights
  (QMoE, MatMulNBits, and MatMul/Gemm with a constant weight) is cut out of the optimized graph
  with its own initializers into a one-node model (``weight_kernels``) and run at decode shape
  (batch 1, T=1; QMoE's router input fixed so that it picks its first K experts), all of a step's
  kernels one after another in graph order, in every round right after the variants and before the
  read rate. Per kernel: the bytes it reads over its median time, as GB/s and as a share of the
  round's read rate. The *ceiling* is the floor time over the sum of the step's kernel times: the
  highest share of its floor the variant could reach if every other node cost nothing; the
  *remainder* is the measured wall time of a decode step minus that sum. For int4 experts + int8
  weights the step's kernels also run as one model in one ``run`` (the same sum without a
  ``run`` per kernel), and a one-node Identity gives the cost of one ``run`` of its own.
- profiles: ONNX Runtime's own (``enable_profiling``), one session per variant after the timed
  rounds; kernel time per op type of one prefill (the second of two) and of the decode steps that
  follow it (mean per step), and the share of the largest ops.

    python benchmarks/bench_quantized_cpu.py [--repeat 6] [--variants NAME ...] [--work DIR] [--out benchmarks/results]

Writes ``quantized_cpu.json`` and ``quantized_cpu.md``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ort_optimize as ort_bench  # noqa: E402 (variants, optimize and the decode bytes, shared)
import bench_runtime_cpu as peer_bench  # noqa: E402 (build, runs, read rate, machine and versions)

VARIANTS = {
    "canonical": None,
    "int8 experts": dict(quantize_experts="int8"),
    "int4 experts": dict(quantize_experts="int4"),
    "int8 experts + int8 weights": dict(quantize_experts="int8", quantize_weights="int8"),
    "int4 experts + int8 weights": dict(quantize_experts="int4", quantize_weights="int8"),
    "int4 experts + int4 weights": dict(quantize_experts="int4", quantize_weights="int4"),
    "int4 experts + int8 weights, weight blocks of 32": dict(quantize_experts="int4", quantize_weights="int8",
                                                             weight_block_size=32),  # the default before 128
    "int4 experts + int8 weights, blocks of 128": dict(quantize_experts="int4", quantize_weights="int8",
                                                       block_size=128),
    "int4 experts + int8 weights, repeated KV heads": dict(quantize_experts="int4", quantize_weights="int8",
                                                           group_attention=False),  # the default before grouping
    "int4 experts + int8 weights + last logits": dict(quantize_experts="int4", quantize_weights="int8",
                                                      last_logits=True),
}
DECODE_FLOOR_TARGET = 0.8  # int4 experts + int8 weights: decode at least this share of its bytes floor
PROFILE_STEPS = 8  # decode steps profiled after the prefill


def profile(folder: Path, prompt: list[int], threads: int, prefix: str) -> dict:
    """Kernel ms per op type: one prefill (the second of two) and the mean of the decode steps after it."""
    import onnxruntime as ort

    options = peer_bench.ort_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = prefix
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    ids = np.array([prompt], np.int64)
    prefill = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(len(prompt))[None]}
    prefill.update({i.name: np.zeros([1, i.shape[1], 0, i.shape[3]], np.float32) for i in pasts})
    for _ in range(2):
        values = dict(zip(names, session.run(names, prefill)))
    for step in range(PROFILE_STEPS):
        total = len(prompt) + step + 1
        feeds = {"input_ids": values["logits"][:, -1].argmax(-1)[:, None], "attention_mask": np.ones((1, total), np.int64),
                 "position_ids": np.array([[total - 1]])}
        feeds.update({i.name: values[i.name.replace("past_key_values.", "present.")] for i in pasts})
        values = dict(zip(names, session.run(names, feeds)))
    path = Path(session.end_profiling())
    events = json.loads(path.read_text())
    path.unlink()
    runs = sorted((e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"), key=lambda e: e["ts"])
    spans = [(r["ts"], r["ts"] + r["dur"]) for r in runs]
    prefill_ops, decode_ops = collections.Counter(), collections.Counter()
    decode_nodes = 0.0
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        index = next((i for i, (a, b) in enumerate(spans) if a <= e["ts"] <= b), None)
        if index == 1:
            prefill_ops[e["args"]["op_name"]] += e["dur"] / 1e3
        elif index is not None and index >= 2:
            decode_ops[e["args"]["op_name"]] += e["dur"] / 1e3 / PROFILE_STEPS
            decode_nodes += 1 / PROFILE_STEPS
    return {"prefill_ms": dict(prefill_ops.most_common()), "decode_ms": dict(decode_ops.most_common()),
            "decode_nodes": round(decode_nodes),
            "prefill_run_ms": spans[1][1] / 1e3 - spans[1][0] / 1e3 if len(spans) > 1 else None}


# --- the weight-reading kernels of a decode step, alone ---------------------------------------------

WEIGHT_OPS = ("QMoE", "MatMulNBits", "MatMul", "Gemm")  # nodes that read weights (with a constant input)
KERNEL_VARIANT = "int4 experts + int8 weights"  # also timed as one model of all its step's kernels
KERNEL_LOOPS = 10  # passes over a step's kernels per round


@dataclass
class Kernel:
    """One weight-reading node of an optimized graph as a one-node ONNX model of its own."""

    name: str  # the node's name in the full graph
    op_type: str
    shape: str  # what distinguishes kernels of one op type: its weights' shapes and attributes
    model: object  # onnx.ModelProto: the node, its initializers, its other inputs as graph inputs (KernelTimer drops it)
    inputs: dict[str, tuple[list[int], np.dtype]]  # graph input -> (decode shape, dtype)
    output: str
    bytes: int  # what it reads at batch 1: its initializers, K/E of the experts'


def weight_kernels(folder: Path) -> list[Kernel]:
    """Every node of ``folder``'s graph (top level, in graph order) that reads a weight: QMoE, MatMulNBits,
    and MatMul/Gemm with a constant initializer, each as a one-node model with its own initializers.

    Inputs that are not initializers become graph inputs of their decode shape (batch 1, T=1): A
    [1, 1, K] of MatMulNBits and MatMul, [1, K] of Gemm; QMoE's x [1, D] and its router inputs [1, E].
    The bytes follow ``bench_ort_optimize.decode_bytes_per_token``: every initializer of the node, and
    K/E of QMoE's expert inputs.
    """
    import onnx
    from onnx import external_data_helper, helper

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)  # each kernel's weights read below
    initializers = {t.name: t for t in model.graph.initializer}
    kernels = []
    for node in model.graph.node:
        constants = [name for name in node.input if name in initializers]
        if node.op_type not in WEIGHT_OPS or not constants:
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        dims = {name: list(initializers[name].dims) for name in constants}
        dtype = onnx.helper.tensor_dtype_to_np_dtype
        share = 1.0
        if node.op_type == "QMoE":  # x [T, D], router_probs [T, E], fc1 [E, 2F, D*bits/8], ..., fc2 [E, D, ...]
            experts, hidden = dims[node.input[2]][0], dims[node.input[5]][1]
            share = attributes["k"] / experts
            act = dtype(initializers[node.input[3]].data_type)  # the scales: in the activation dtype
            inputs = {name: ([1, experts] if i in (1, 14) else [1, hidden], act)
                      for i, name in enumerate(node.input) if name and name not in initializers}
            ffn = dims[node.input[2]][1] // (2 if attributes.get("swiglu_fusion", 0) else 1)
            shape = (f"top-{attributes['k']} of {experts} experts: {hidden} x {dims[node.input[2]][1]}, {ffn} x "
                     f"{hidden}, {attributes['expert_weight_bits']} bits, blocks of {attributes.get('block_size', 0)}, "
                     f"accuracy_level {attributes.get('accuracy_level', 0)}")
        elif node.op_type == "MatMulNBits":
            k, n = attributes["K"], attributes["N"]
            act = dtype(initializers[node.input[2]].data_type)
            inputs = {node.input[0]: ([1, 1, k], act)}
            shape = (f"{k} x {n}, {attributes['bits']} bits, blocks of {attributes['block_size']}, "
                     f"accuracy_level {attributes.get('accuracy_level', 0)}")
        else:  # MatMul / Gemm: the weight is input 1
            if node.input[1] not in initializers or node.input[0] in initializers:
                continue
            w = dims[node.input[1]]
            k, n = (w[1], w[0]) if attributes.get("transB", 0) else (w[0], w[1])
            act = dtype(initializers[node.input[1]].data_type)
            inputs = {node.input[0]: ([1, k] if node.op_type == "Gemm" else [1, 1, k], act)}
            shape = f"{k} x {n}, {act.name}"
        nbytes = 0.0
        for i, name in enumerate(node.input):
            if name in initializers:
                size = int(np.prod(dims[name], dtype=np.int64)) * dtype(initializers[name].data_type).itemsize
                nbytes += size * (share if node.op_type == "QMoE" and i >= 2 else 1.0)
        weights = []
        for name in dict.fromkeys(constants):  # read from the weights file kernel by kernel: one copy in memory
            tensor = onnx.TensorProto()
            tensor.CopyFrom(initializers[name])
            if external_data_helper.uses_external_data(tensor):
                external_data_helper.load_external_data_for_tensor(tensor, str(folder))
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]
            weights.append(tensor)
        graph = helper.make_graph(
            [node], f"kernel_{node.name}",
            [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(dt), shape_)
             for name, (shape_, dt) in inputs.items()],
            [helper.make_tensor_value_info(node.output[0], helper.np_dtype_to_tensor_dtype(act), None)],
            weights,
        )
        one = helper.make_model(graph, opset_imports=list(model.opset_import))
        one.ir_version = model.ir_version
        kernels.append(Kernel(node.name, node.op_type, shape, one, inputs, node.output[0], int(nbytes)))
    return kernels


def decode_feeds(kernel: Kernel, seed: int = 0) -> dict[str, np.ndarray]:
    """Decode-shaped inputs of ``kernel``: random activations; QMoE's router inputs pick its first K experts."""
    rng = np.random.default_rng(seed)
    node = kernel.model.graph.node[0]
    feeds = {name: rng.standard_normal(shape).astype(dtype) for name, (shape, dtype) in kernel.inputs.items()}
    if kernel.op_type == "QMoE":
        k = next(a.i for a in node.attribute if a.name == "k")
        for index, value in ((1, 1.0), (14, 1.0 / k)):  # router_probs: logits 1 vs 0; router_weights: 1/k
            if len(node.input) > index and node.input[index] in feeds:
                route = np.zeros_like(feeds[node.input[index]])  # [1, E]
                route[0, :k] = value
                feeds[node.input[index]] = route
    return feeds


def step_model(kernels: list[Kernel]) -> tuple[object, list[dict[str, str]]]:
    """All of ``kernels`` in one graph, one after another, for one ``run``: (model, per kernel the name of
    each of its inputs and of its output in that graph, prefixed ``k{i}.`` to keep them apart)."""
    import onnx
    from onnx import helper

    nodes, inputs, outputs, initializers, renames = [], [], [], {}, []
    for i, kernel in enumerate(kernels):
        graph = kernel.model.graph
        rename = {name: f"k{i}.{name}" for name in [*kernel.inputs, kernel.output]}
        node = onnx.NodeProto()
        node.CopyFrom(graph.node[0])
        node.name = f"k{i}.{node.name}"
        node.input[:] = [rename.get(name, name) for name in node.input]
        node.output[:] = [rename[node.output[0]]]
        nodes.append(node)
        for value in [*graph.input, *graph.output]:
            renamed = onnx.ValueInfoProto()
            renamed.CopyFrom(value)
            renamed.name = rename[value.name]
            (outputs if value.name == kernel.output else inputs).append(renamed)
        initializers.update({t.name: t for t in graph.initializer})
        renames.append(rename)
    first = kernels[0].model
    model = helper.make_model(helper.make_graph(nodes, "decode_step_kernels", inputs, outputs,
                                                list(initializers.values())),
                              opset_imports=list(first.opset_import))
    model.ir_version = first.ir_version
    return model, renames


def share_one_thread_pool(threads: int) -> None:
    """One intra-op pool of ``threads`` for every session of this process (``KernelTimer``'s): call before the
    first session. One pool per session would leave the threads of the kernel just run spinning on the
    cores while the next kernel's session runs, which slowed sub-millisecond kernels several times."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    ort_state.set_global_thread_pool_sizes(threads, 1)


class KernelTimer:
    """The one-node sessions of a folder's decode-step kernels, timed one after another in graph order
    (on the process's shared thread pool: ``share_one_thread_pool`` first)."""

    def __init__(self, folder: Path, whole_step: bool = False):
        import onnxruntime as ort
        from onnx import TensorProto, helper

        self.kernels = weight_kernels(folder)
        options = ort.SessionOptions()  # the threads are the shared pool's (share_one_thread_pool)
        options.log_severity_level = 3
        options.use_per_session_threads = False

        def session(model):
            return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

        self.runs = []
        for kernel in self.kernels:
            self.runs.append(self._bound(session(kernel.model), decode_feeds(kernel), [kernel.output]))
        self.step = None
        if whole_step:
            model, renames = step_model(self.kernels)
            feeds = {renames[i][name]: value for i, kernel in enumerate(self.kernels)
                     for name, value in decode_feeds(kernel).items()}
            outputs = [rename[k.output] for k, rename in zip(self.kernels, renames)]
            self.step = self._bound(session(model), feeds, outputs)
        for kernel in self.kernels:  # the sessions hold the weights now: keep the descriptions only
            kernel.model = None
        identity = helper.make_model(helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])], "one_run",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1024])]),
            opset_imports=[helper.make_opsetid("", 17)])
        identity.ir_version = 8
        self.identity = self._bound(session(identity), {"x": np.zeros((1, 1024), np.float32)}, ["y"])
        for _ in range(3):  # warm-up
            self.measure(loops=1)

    @staticmethod
    def _bound(session, feeds: dict, outputs: list[str]):
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name in outputs:
            binding.bind_output(name)

        def run():
            start = time.perf_counter()
            session.run_with_iobinding(binding)
            return time.perf_counter() - start

        return run

    def measure(self, loops: int = KERNEL_LOOPS) -> dict:
        """Median ms per kernel (over ``loops`` passes over the step), of the one-run step and of a bare run."""
        times = [[] for _ in self.kernels]
        step, bare = [], []
        for _ in range(loops):
            for i, run in enumerate(self.runs):
                times[i].append(run())
            bare.append(self.identity())
            if self.step is not None:
                step.append(self.step())
        return {"kernel_ms": [statistics.median(t) * 1e3 for t in times],
                "step_ms": statistics.median(step) * 1e3 if step else None,
                "run_ms": statistics.median(bare) * 1e3}


def kernel_worker(conn, folders: dict[str, Path], threads: int) -> None:
    """A process of its own for the kernel timers (ONNX Runtime's shared pool is per process, and the
    variants' sessions keep their own pools): sends what it times, then one ``measure()`` per request."""
    share_one_thread_pool(threads)
    timers = {name: KernelTimer(folder, whole_step=name == KERNEL_VARIANT) for name, folder in folders.items()}
    conn.send({name: [{"name": k.name, "op_type": k.op_type, "shape": k.shape, "bytes": k.bytes} for k in timer.kernels]
               for name, timer in timers.items()})
    while conn.recv():
        conn.send({name: timer.measure() for name, timer in timers.items()})
    conn.send(peer_bench.peak_rss_gb())


def measure(folders: dict[str, Path], prompt: list[int], steps: int, repeat: int, threads: int, work: Path,
            kernel_variants: list[str]) -> dict:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    conn, child = context.Pipe()
    worker = context.Process(target=kernel_worker, args=(child, {n: folders[n] for n in kernel_variants}, threads))
    worker.start()
    kernels = {name: {"kernels": described, "rounds": []} for name, described in conn.recv().items()}
    runs = {name: peer_bench.moetrt_run(folder, prompt, steps, backend="ort",
                                        session_options=peer_bench.ort_options(threads))
            for name, folder in folders.items()}
    tokens = {name: run()[3] for name, run in runs.items()}  # warm-up
    matmul = peer_bench.MatMulReadRate(threads)
    prefill = {name: [] for name in runs}
    decode = {name: [] for name in runs}
    read_rate, loads = [], []
    order = list(runs)
    for round_ in range(repeat):
        for name in order[round_ % len(order):] + order[: round_ % len(order)]:
            seconds, decode_seconds, steps_run, _ = runs[name]()
            prefill[name].append(seconds * 1e3)
            decode[name].append(steps_run / decode_seconds)
        conn.send(True)
        for name, measured in conn.recv().items():
            kernels[name]["rounds"].append(measured)
        read_rate.append(matmul.measure()["gb_per_s"])
        loads.append(os.getloadavg()[0])
        peer_bench.log(f"round {round_ + 1}: read {read_rate[-1]:.1f} GB/s; " + ", ".join(
            f"{name} {prefill[name][-1]:.0f} ms / {decode[name][-1]:.0f} tok/s" for name in order))
    conn.send(False)
    kernel_rss = conn.recv()
    worker.join()
    del runs, matmul
    profiles = {name: profile(folder, prompt, threads, str(work / "profile")) for name, folder in folders.items()}
    return {"prefill_ms": prefill, "decode_tok_s": decode, "read_gb_s": read_rate, "tokens": tokens,
            "load_after_round": loads, "profiles": profiles, "kernels": kernels,
            "peak_rss_gb": peer_bench.peak_rss_gb(), "kernel_peak_rss_gb": kernel_rss}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=6, help="rounds after the warm-up")
    parser.add_argument("--prompt", type=int, default=256, help="prefill tokens (batch 1)")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="a subset to run (canonical always runs: prefill is compared with it)")
    parser.add_argument("--work", type=Path, default=None, help="keep the exported/optimized folders here (reused)")
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
    peer_bench.in_subprocess(peer_bench.build_moetrt, args.work, args.threads)
    src = args.work / "canonical"
    names = [name for name in VARIANTS if name == "canonical" or name in args.variants]
    folders = {name: ort_bench.optimized(src, args.work, name, VARIANTS[name]) for name in names}
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, args.prompt).tolist()
    quantized = [name for name in names if VARIANTS[name] is not None]  # their graphs hold every weight kernel
    measured = peer_bench.in_subprocess(measure, folders, prompt, args.decode_tokens, args.repeat, args.threads,
                                        args.work, quantized)
    context = args.prompt + args.decode_tokens // 2
    canonical = measured["prefill_ms"]["canonical"]
    rows = []
    for name, folder in folders.items():
        prefill, decode = measured["prefill_ms"][name], measured["decode_tok_s"][name]
        nbytes = ort_bench.decode_bytes_per_token(folder, context)
        floor = [rate * 1e9 / nbytes for rate in measured["read_gb_s"]]  # tok/s the bytes allow, round by round
        rows.append({
            "variant": name, "prefill_ms": statistics.median(prefill), "decode_tok_s": statistics.median(decode),
            "prefill_vs_canonical": statistics.median(c / p for c, p in zip(canonical, prefill)),
            "decode_bytes_per_token": nbytes, "floor_tok_s": statistics.median(floor),
            "decode_vs_floor": statistics.median(d / f for d, f in zip(decode, floor)),
            "prefill_ms_runs": prefill, "decode_tok_s_runs": decode, "profile": measured["profiles"][name],
            "kernels": (kernel_summary(measured["kernels"][name], nbytes, measured["read_gb_s"], decode)
                        if name in measured["kernels"] else None),
        })
    result = {
        "benchmark": "bench-small quantized on ONNX Runtime CPU: prefill vs the fp32 canonical, decode vs its bytes floor",
        "command": " ".join(["python benchmarks/bench_quantized_cpu.py",
                             *peer_bench.named_work(sys.argv[1:] if argv is None else argv)]),
        "workload": {"batch": 1, "prompt": args.prompt, "decode_tokens": args.decode_tokens, "repeat": args.repeat,
                     "threads": args.threads},
        "machine": peer_bench.machine_info(args.threads), "versions": peer_bench.versions(),
        "load_average": {"before": load_before, "after": os.getloadavg(),
                         "after_each_round": measured["load_after_round"]},
        "read_gb_s": measured["read_gb_s"], "wall_seconds": time.perf_counter() - started,
        "peak_rss_gb": measured["peak_rss_gb"], "kernel_peak_rss_gb": measured["kernel_peak_rss_gb"], "rows": rows,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantized_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    write_report(args.out / "quantized_cpu.md", result)
    if tmp is not None:
        tmp.cleanup()
    print((args.out / "quantized_cpu.md").read_text())
    return 0


def kernel_summary(measured: dict, floor_bytes: int, read_gb_s: list[float], decode_tok_s: list[float]) -> dict:
    """A variant's isolated kernels against its floor, round by round then the median over rounds.

    Per kernel shape: its count in the step, bytes, ms (the mean of its kernels in a round), GB/s and
    share of the round's read rate. The step: the sum of its kernels' times, the floor time (its bytes at
    the round's read rate), the ceiling (floor / sum), the wall step time (1 / decode tok/s) and the
    remainder (wall step - sum).
    """
    kernels, rounds = measured["kernels"], measured["rounds"]
    groups: dict[str, list[int]] = {}
    for i, kernel in enumerate(kernels):
        groups.setdefault(f"{kernel['op_type']}: {kernel['shape']}", []).append(i)
    shapes = []
    for label, members in groups.items():
        nbytes = kernels[members[0]]["bytes"]
        ms = [statistics.fmean(r["kernel_ms"][i] for i in members) for r in rounds]
        shapes.append({"kernel": label, "op_type": kernels[members[0]]["op_type"], "count": len(members),
                       "bytes": nbytes, "ms": statistics.median(ms),
                       "gb_s": statistics.median(nbytes / m / 1e6 for m in ms),
                       "of_read_rate": statistics.median(nbytes / m / 1e6 / rate for m, rate in zip(ms, read_gb_s))})
    ops = {}
    for op in dict.fromkeys(k["op_type"] for k in kernels):
        members = [i for i, k in enumerate(kernels) if k["op_type"] == op]
        nbytes = sum(kernels[i]["bytes"] for i in members)
        ms = [sum(r["kernel_ms"][i] for i in members) for r in rounds]
        ops[op] = {"count": len(members), "bytes": nbytes, "ms": statistics.median(ms),
                   "gb_s": statistics.median(nbytes / m / 1e6 for m in ms),
                   "of_read_rate": statistics.median(nbytes / m / 1e6 / rate for m, rate in zip(ms, read_gb_s))}
    sums = [sum(r["kernel_ms"]) for r in rounds]
    floors = [floor_bytes / rate / 1e6 for rate in read_gb_s]  # ms
    steps = [1e3 / tok_s for tok_s in decode_tok_s]
    one_run = [r["step_ms"] for r in rounds if r["step_ms"] is not None]
    return {
        "shapes": shapes, "by_op": ops, "count": len(kernels), "bytes": sum(k["bytes"] for k in kernels),
        "sum_ms": statistics.median(sums), "floor_ms": statistics.median(floors),
        "ceiling": statistics.median(f / s for f, s in zip(floors, sums)),
        "step_ms": statistics.median(steps), "remainder_ms": statistics.median(t - s for t, s in zip(steps, sums)),
        "one_run_ms": statistics.median(one_run) if one_run else None,
        "one_run_ceiling": statistics.median(f / s for f, s in zip(floors, one_run)) if one_run else None,
        "bare_run_ms": statistics.median(r["run_ms"] for r in rounds),
        "sum_ms_runs": sums, "floor_ms_runs": floors,
    }


def _top(ops: dict[str, float], count: int = 4) -> str:
    total = sum(ops.values()) or 1.0
    return ", ".join(f"{op} {ms:.1f} ({100 * ms / total:.0f}%)" for op, ms in list(ops.items())[:count])


def write_report(path: Path, result: dict) -> None:
    m, v, w, loads = result["machine"], result["versions"], result["workload"], result["load_average"]
    rounds = loads["after_each_round"]
    lines = [
        "# Quantized bench-small on ONNX Runtime CPU: prefill against fp32, decode against its bytes floor",
        "",
        (f"{result['date']}. {m['cpu']}, 2 shared cores under load, {w['threads']} threads, {m['memory']}, "
         f"{m['platform']}. Python {v['python']}, onnxruntime {v['onnxruntime']}, torch {v['torch']}, "
         f"moetrt {v['moetrt']} ({v['moetrt_commit']})."),
        (f"bench-small (random weights), batch 1: prefill of {w['prompt']} tokens, then {w['decode_tokens']} greedy "
         f"decode steps, through `Session(folder, backend=\"ort\")`; every variant loaded together, one warm-up, then "
         f"{w['repeat']} rounds in a rotating order, each followed by the read rate of an fp32 MatMul. Command: "
         f"`{result['command']}` ({result['wall_seconds'] / 60:.1f} min, peak memory {result['peak_rss_gb']:.1f} GB, "
         f"{result.get('kernel_peak_rss_gb', 0):.1f} GB in the kernel timers' process). "
         f"Load average (1/5/15 min): {' / '.join(f'{x:.2f}' for x in loads['before'])} before, "
         f"{' / '.join(f'{x:.2f}' for x in loads['after'])} after; 1-min after each round "
         f"{min(rounds):.2f}-{max(rounds):.2f}. Read rate over rounds: "
         f"{min(result['read_gb_s']):.1f}-{max(result['read_gb_s']):.1f} GB/s (median "
         f"{statistics.median(result['read_gb_s']):.1f})."),
        "",
        ("| variant | prefill 1x256 ms | prefill vs canonical | decode tok/s | bytes per decode token | floor tok/s "
         "| decode vs its floor |"),
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['variant']} | {row['prefill_ms']:.0f} | {row['prefill_vs_canonical']:.2f}x | "
                     f"{row['decode_tok_s']:.1f} | {row['decode_bytes_per_token'] / 1e6:.0f} MB | "
                     f"{row['floor_tok_s']:.1f} | {row['decode_vs_floor']:.0%} |")
    lines += ["", ("*prefill vs canonical*: median over rounds of canonical's prefill time over the variant's in the "
                   "same round (above 1: faster). *floor*: the bytes one decode step reads at the MatMul read rate "
                   "measured after the same round; *decode vs its floor*: median over rounds of tok/s over that floor."),
              "", "**Targets**:", ""]
    quantized = [row for row in result["rows"] if row["variant"] != "canonical"]
    slowest = min(quantized, key=lambda row: row["prefill_vs_canonical"])
    lines.append(f"- every quantized variant's prefill >= the fp32 canonical's in the same run: slowest "
                 f"{slowest['variant']} {slowest['prefill_vs_canonical']:.2f}x "
                 f"({'met' if slowest['prefill_vs_canonical'] >= 1.0 else 'not met'}).")
    target = next((row for row in result["rows"] if row["variant"] == "int4 experts + int8 weights"), None)
    if target is not None:
        lines.append(f"- int4 experts + int8 weights decode >= {DECODE_FLOOR_TARGET:.0%} of its bytes floor: "
                     f"{target['decode_vs_floor']:.0%} "
                     f"({'met' if target['decode_vs_floor'] >= DECODE_FLOOR_TARGET else 'not met'}).")
    lines += ["", "## Where the time goes (ONNX Runtime's profile: kernel ms per op type)", "",
              "| variant | prefill 1x256: kernel ms | largest ops (ms, share) | decode step: kernel ms | largest ops (ms, share) |",
              "|---|---|---|---|---|"]
    for row in result["rows"]:
        p = row["profile"]
        lines.append(f"| {row['variant']} | {sum(p['prefill_ms'].values()):.0f} | {_top(p['prefill_ms'])} | "
                     f"{sum(p['decode_ms'].values()):.1f} | {_top(p['decode_ms'])} |")
    lines += kernel_report(result["rows"])
    path.write_text("\n".join(lines) + "\n")


def kernel_report(rows: list[dict]) -> list[str]:
    """The report's section on the weight-reading kernels alone, with what they bound (computed)."""
    rows = [row for row in rows if row.get("kernels")]
    if not rows:
        return []
    lines = ["", "## Weight-reading kernels alone at decode shape (batch 1, T=1)", "",
             ("Every node of a decode step that reads weights (QMoE, MatMulNBits, MatMul/Gemm with a constant weight) "
              "cut out of the optimized graph with its own initializers into a one-node model, QMoE's router input "
              f"fixed to pick K experts; a step's kernels run one after another in graph order, {KERNEL_LOOPS} passes "
              "per round, in every round between the variants and the read rate, on one intra-op pool of the same "
              "threads. Medians over rounds of each round's median; *GB/s*: the bytes the kernel reads (its "
              "initializers, K/E of the experts') over its time; *of read rate*: over the fp32 MatMul read rate of "
              "the same round."), ""]
    target = next((row for row in rows if row["variant"] == KERNEL_VARIANT), None)
    if target is not None:
        k = target["kernels"]
        lines += [f"**{KERNEL_VARIANT}**, per kernel:", "",
                  "| kernel | per step | MB each | ms each | GB/s | of read rate |", "|---|---|---|---|---|---|"]
        for shape in k["shapes"]:
            lines.append(f"| {shape['kernel']} | {shape['count']} | {shape['bytes'] / 1e6:.2f} | {shape['ms']:.3f} | "
                         f"{shape['gb_s']:.1f} | {shape['of_read_rate']:.0%} |")
        lines.append("")
    lines += [("| variant | kernels per step | MB they read (of the floor's) | by op: ms per step, GB/s, of read rate "
               "| sum of kernel ms | floor ms | **ceiling** | decode step ms (wall) | remainder ms (of the step) |"),
              "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        k = row["kernels"]
        ops = "; ".join(f"{op} x{o['count']} {o['ms']:.2f} ms, {o['gb_s']:.1f} GB/s, {o['of_read_rate']:.0%}"
                        for op, o in k["by_op"].items())
        share = k["bytes"] / row["decode_bytes_per_token"]
        lines.append(f"| {row['variant']} | {k['count']} | {k['bytes'] / 1e6:.0f} ({share:.0%}) | "
                     f"{ops} | {k['sum_ms']:.2f} | {k['floor_ms']:.2f} | **{k['ceiling']:.0%}** | {k['step_ms']:.2f} | "
                     f"{k['remainder_ms']:.2f} ({k['remainder_ms'] / k['step_ms']:.0%}) |")
    lines += ["", ("*ceiling*: median over rounds of the floor time (the variant's decode bytes at the round's read "
                   "rate) over the sum of its step's kernel times: the highest share of its floor the variant could reach if "
                   "every other node, and the runtime loop, cost nothing. *remainder*: median over rounds of the wall "
                   "time of a decode step (from the decode tok/s above) minus that sum: what the other nodes and the "
                   "loop cost.")]
    if target is not None:
        k = target["kernels"]
        lines += ["", (f"Checks on {KERNEL_VARIANT}: its step's kernels as one model in one `run` take "
                       f"{k['one_run_ms']:.2f} ms (ceiling {k['one_run_ceiling']:.0%}), against {k['sum_ms']:.2f} ms "
                       f"run one by one; one `run` of a one-node Identity costs {k['bare_run_ms'] * 1e3:.0f} us "
                       f"({k['count']} of them: {k['count'] * k['bare_run_ms']:.2f} ms).")]
        other = {op: ms for op, ms in target["profile"]["decode_ms"].items() if op not in WEIGHT_OPS}
        other_ms, nodes = sum(other.values()), target["profile"].get("decode_nodes", 0)
        where = (f"the other ~{nodes - k['count']} nodes of the step: their kernel time in the profile above, "
                 f"{other_ms:.2f} ms a step ({_top(other, 5)}), covers all of it (with their dispatch: the profile "
                 "cannot tell them apart), leaving nothing measurable to ONNX Runtime's run entry or the runtime loop"
                 if other_ms >= k["remainder_ms"] else
                 f"mostly the other ~{nodes - k['count']} nodes of the step: their kernel time in the profile above is "
                 f"{other_ms:.2f} ms a step ({_top(other, 5)}); the rest, {k['remainder_ms'] - other_ms:.2f} ms, is "
                 "ONNX Runtime's dispatch of the nodes, its run entry and the runtime loop")
        lines += ["", f"The remainder of {KERNEL_VARIANT} ({k['remainder_ms']:.2f} ms a step) is {where}."]
        best = k["ceiling"]
        ops = k["by_op"]
        rates = ", ".join(f"{op} {o['gb_s']:.1f} GB/s ({o['of_read_rate']:.0%} of the read rate)"
                          for op, o in ops.items())
        if best < DECODE_FLOOR_TARGET:
            lines += ["", (f"**What bounds the target**: the weight-reading kernels alone allow {KERNEL_VARIANT} at "
                           f"most {best:.0%} of its bytes floor (target {DECODE_FLOOR_TARGET:.0%}), even if every other "
                           f"node cost nothing: they read at {rates}, where the floor assumes the fp32 MatMul's rate. "
                           f"The rest of the step ({k['remainder_ms']:.2f} ms of {k['step_ms']:.2f}) takes the "
                           f"measured share down to {target['decode_vs_floor']:.0%}.")]
        else:
            lines += ["", (f"**What bounds the target**: not the kernels: alone they allow {KERNEL_VARIANT} "
                           f"{best:.0%} of its bytes floor (target {DECODE_FLOOR_TARGET:.0%}; they read at {rates}); "
                           f"the rest of the step, {k['remainder_ms']:.2f} ms of {k['step_ms']:.2f}, takes the "
                           f"measured share down to {target['decode_vs_floor']:.0%}.")]
    return lines


if __name__ == "__main__":
    sys.exit(main())
