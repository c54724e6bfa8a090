"""SparseMoE's function body on ONNX Runtime CPU: this tree's body against the one at a git revision.

    python benchmarks/bench_sparse_moe_body.py --base 81adc6f    # the body with an If (before TensorRT for RTX)

One SparseMoE node with tiny's expert shapes (E 8, D 128, F 192, top-2; the decode path gathers
the routed experts' weights), one ONNX Runtime thread; runs of the two bodies interleave so a
change in load hits both alike; medians of 7 rounds, and the largest output difference.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _session(module, num_experts, w_gate_up, w_down, k):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from moetrt.ops._onnx import DOMAIN

    D = w_gate_up.shape[2]
    node = helper.make_node("SparseMoE", ["x", "weights", "indices", "w_gate_up", "w_down"], ["y"], domain=DOMAIN)
    graph = helper.make_graph(
        [node], "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", D]),
         helper.make_tensor_value_info("weights", TensorProto.FLOAT, ["T", k]),
         helper.make_tensor_value_info("indices", TensorProto.INT32, ["T", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", D])],
        initializer=[onnx.numpy_helper.from_array(w_gate_up, "w_gate_up"), onnx.numpy_helper.from_array(w_down, "w_down")])
    model = helper.make_model(graph, functions=[module.onnx_function(20, num_experts)],
                              opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision whose moetrt/ops/sparse_moe.py is the baseline")
    parser.add_argument("--tokens", type=int, nargs="*", default=[1, 4, 64])
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    current = importlib.import_module("moetrt.ops.sparse_moe")
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{args.base}:moetrt/ops/sparse_moe.py"],
                            capture_output=True, text=True, check=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sparse_moe_base.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("moetrt.ops.sparse_moe_base", path)
        base = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(base)
    E, D, F, K = 8, 128, 192, 2
    rng = np.random.default_rng(0)
    w_gate_up = (rng.standard_normal((E, 2 * F, D)) * 0.1).astype(np.float32)
    w_down = (rng.standard_normal((E, D, F)) * 0.1).astype(np.float32)
    sessions = {args.base: _session(base, E, w_gate_up, w_down, K), "this tree": _session(current, E, w_gate_up, w_down, K)}
    print(f"| T | {args.base} us | this tree us | ratio | max abs diff |\n|---|---|---|---|---|")
    for T in args.tokens:
        feeds = {"x": rng.standard_normal((T, D)).astype(np.float32), "weights": rng.random((T, K)).astype(np.float32),
                 "indices": np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32)}
        outs = [s.run(None, feeds)[0] for s in sessions.values()]
        diff = float(np.abs(outs[0] - outs[1]).max())
        times = {name: [] for name in sessions}
        for _ in range(7):
            for name, sess in sessions.items():
                n = 200 if T < 64 else 50
                started = time.perf_counter()
                for _ in range(n):
                    sess.run(None, feeds)
                times[name].append((time.perf_counter() - started) / n * 1e6)
        base_us, new_us = (float(np.median(t)) for t in times.values())
        print(f"| {T} | {base_us:.0f} | {new_us:.0f} | {new_us / base_us:.2f} | {diff:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
