"""Hybrid linear-attention MoE on the CPU: the function-body graph, the ORT-lowered graph and transformers eager.

A random Qwen3.5-MoE text model shaped like ``bench-small`` (vocab 32000, d 1024, 4 layers, 8 query
heads of 128 over 2 KV heads, 8 experts top-2) with Qwen3.5's hybrid layout: three Gated DeltaNet
layers then one full-attention layer, DeltaNet 4 key heads / 8 value heads of 128, conv width 4,
partial rotary 0.25, a gated shared expert; expert dim ``--ffn`` (default 1024, a quarter of
bench-small's 3584, so the export fits a shared 2-core machine). Measured in one run, batch 1:

- ``transformers eager``: ``Qwen3_5MoeForCausalLM`` with its torch fallbacks (chunked delta rule
  for prefill, recurrent step for decode);
- ``moetrt torch``: the reference model in PyTorch (the same chunked / recurrent math);
- ``ort canonical``: the canonical export on ONNX Runtime (the delta rule as a standard ``Scan``);
- ``ort-cpu lowered``: ``optimize --target ort-cpu`` of it (``com.microsoft::LinearAttention`` for
  the Scan, the MoE as it lowers by default).

Prefill: median ms of ``--prompt`` tokens from empty state. Decode: median tokens/s over
``--steps`` single-token steps after that prefill, each step fed the previous step's state.

    python benchmarks/bench_hybrid.py [--prompt 128] [--steps 32] [--repeats 3] [--threads 2] [--out benchmarks/results]

Writes ``hybrid.json`` and ``hybrid.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtime_cpu import machine_info, versions  # noqa: E402  (one record of the machine for every benchmark)


def hf_model(ffn: int):
    import transformers

    config = transformers.Qwen3_5MoeTextConfig(
        vocab_size=32000, hidden_size=1024, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        head_dim=128, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=ffn,
        shared_expert_intermediate_size=ffn, linear_num_key_heads=4, linear_num_value_heads=8,
        linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4, full_attention_interval=4,
        max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                       "partial_rotary_factor": 0.25},
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                          experts_implementation="eager", dtype=torch.float32)
    return model.eval()


def time_torch(forward, prompt: list[int], steps: int, repeats: int) -> tuple[float, float]:
    """Median prefill ms and decode tok/s of ``forward(ids, cache) -> (logits, cache)`` (cache None: prefill)."""
    ids = torch.tensor([prompt])
    prefill = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            logits, cache = forward(ids, None)
            prefill.append(time.perf_counter() - start)
        token, step_times = logits[:, -1:].argmax(-1), []
        for _ in range(steps):
            start = time.perf_counter()
            logits, cache = forward(token, cache)
            step_times.append(time.perf_counter() - start)
            token = logits[:, -1:].argmax(-1)
    return 1e3 * statistics.median(prefill), 1.0 / statistics.median(step_times)


def hf_forward(model):
    """transformers' forward with its cache (the moetrt torch row: the reference model's own)."""
    def forward(ids, cache):
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        return out.logits, out.past_key_values
    return forward


def moetrt_forward(model):
    """The reference model in PyTorch (its chunked prefill and recurrent decode, the same math as transformers')."""
    def forward(ids, cache):
        out = model(ids, past_key_values=cache)
        return out.logits, out.past_key_values
    return forward


def time_ort(folder: Path, state, prompt: list[int], steps: int, repeats: int, threads: int) -> tuple[float, float]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    empty = {n: np.zeros(s, np.float32) for n, s in state.empty_past(1).items()}
    n = len(prompt)
    feeds = {"input_ids": np.array([prompt]), "attention_mask": np.ones((1, n), np.int64),
             "position_ids": np.arange(n)[None], **empty}
    prefill = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = dict(zip(names, session.run(None, feeds)))
        prefill.append(time.perf_counter() - start)
    step_times, past = [], n
    for _ in range(steps):
        token = out["logits"][:, -1:].argmax(-1)
        feeds = {"input_ids": token, "attention_mask": np.ones((1, past + 1), np.int64),
                 "position_ids": np.array([[past]]), **{p: out[c] for c, p in state.pairs()}}
        start = time.perf_counter()
        out = dict(zip(names, session.run(None, feeds)))
        step_times.append(time.perf_counter() - start)
        past += 1
    return 1e3 * statistics.median(prefill), 1.0 / statistics.median(step_times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)

    import moetrt
    from moetrt.export import onnx_from_torch
    from moetrt.optimize import optimize

    hf = hf_model(args.ffn)
    model = moetrt.from_pretrained(hf)
    prompt = [int(t) for t in torch.randint(1, 32000, (args.prompt,), generator=torch.Generator().manual_seed(0))]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        canonical = onnx_from_torch(model, Path(tmp) / "canonical", progress=False)
        lowered = optimize(canonical, Path(tmp) / "lowered", "ort-cpu", progress=False)
        rows["transformers eager"] = time_torch(hf_forward(hf), prompt, args.steps, args.repeats)
        rows["moetrt torch (reference model)"] = time_torch(moetrt_forward(model), prompt, args.steps,
                                                            args.repeats)
        rows["ort canonical (Scan)"] = time_ort(canonical, model.state, prompt, args.steps, args.repeats, args.threads)
        rows["ort-cpu lowered (LinearAttention)"] = time_ort(lowered, model.state, prompt, args.steps, args.repeats,
                                                             args.threads)
    base_prefill, base_decode = rows["transformers eager"]
    cfg = model.config
    sizes = {"vocab": cfg.vocab_size, "d": cfg.hidden_size, "layers": list(cfg.layer_types),
             "heads": f"{cfg.num_attention_heads} q / {cfg.num_key_value_heads} kv of {cfg.head_dim}",
             "deltanet": f"{cfg.linear_num_key_heads} k / {cfg.linear_num_value_heads} v heads of "
                         f"{cfg.linear_key_head_dim}, conv {cfg.linear_conv_kernel_dim}",
             "experts": f"{cfg.num_experts} top-{cfg.num_experts_per_tok}, F {cfg.intermediate_size}, shared "
                        f"{cfg.shared_expert_intermediate_size}"}
    result = {"sizes": sizes, "prompt": args.prompt, "steps": args.steps, "repeats": args.repeats,
              "machine": machine_info(args.threads), "versions": versions(),
              "rows": {k: {"prefill_ms": p, "decode_tok_s": d, "prefill_speedup": base_prefill / p,
                           "decode_speedup": d / base_decode} for k, (p, d) in rows.items()}}
    out = Path(args.out)
    (out / "hybrid.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Hybrid linear-attention MoE on the CPU", "",
             f"`python benchmarks/bench_hybrid.py --prompt {args.prompt} --steps {args.steps} --repeats {args.repeats} "
             f"--threads {args.threads} --ffn {args.ffn}`: a random Qwen3.5-MoE text model, batch 1, fp32. Sizes: "
             + "; ".join(f"{k} {v}" for k, v in sizes.items()) + ".", "",
             f"| graph | prefill {args.prompt} tokens (ms, median) | x eager | decode (tok/s, median step) | x eager |",
             "|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {r['prefill_ms']:.1f} | {r['prefill_speedup']:.2f} | {r['decode_tok_s']:.1f} | "
                     f"{r['decode_speedup']:.2f} |")
    lines += ["", "Machine: " + ", ".join(f"{k} {v}" for k, v in result["machine"].items())
              + " (2 shared cores under load: other jobs ran at the same time, so ratios within this run "
              "are what to read, not absolute numbers)", "",
              "transformers runs its torch fallbacks here (no flash-linear-attention / causal-conv1d kernels on the "
              "CPU) and its eager per-expert loop; the moetrt torch row is the reference model on the same torch.", "",
              "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()), ""]
    (out / "hybrid.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
