#!/usr/bin/env python3
"""End-to-end check of the TensorRT path on a machine with an NVIDIA GPU and TensorRT (>= 10.9).

What it does (repository root, or anywhere with moetrt installed)::

    python scripts/check_tensorrt.py                    # the shipped "tiny" model, fp16, AOT and JIT plugins
    python scripts/check_tensorrt.py --plugins aot --dtype bf16 --work trt-check

1. environment: versions of TensorRT, torch (CUDA), triton, Polygraphy; the GPU;
2. export: the preset model (default ``tiny``, the trained model that ships with moetrt) to the
   canonical ONNX in ``--dtype`` (default fp16);
3. build: one engine per plugin mode (``aot``: the Triton kernels compiled to PTX inside the
   engine; ``jit``: Python plugins) with a small profile, sharing one timing cache;
4. parity: logits and the KV cache of a prefill (2 rows, 16 tokens, row 1 left-padded by 3) and of
   4 more tokens on its cache, against the fp32 PyTorch model, within the tolerance table of
   ``moetrt.parity.tolerances`` for the engine's dtype (fp16: logits atol 5e-2, rtol 2e-2);
5. greedy generation: the tokens of 24 greedy steps for two prompts must equal those of the
   torch back end (fp32 on the GPU);
6. timing: median milliseconds of a prefill (batch 1, 128 tokens) and of a decode step (batch 1,
   128 cached tokens) for the torch back end in the engine's dtype on the GPU and each engine.

Exit code 0 when every check passes, 1 when one fails, 3 when something it needs is missing.
Everything goes to ``--work`` (default: a temporary folder, removed unless ``--keep``), with a
``check_tensorrt.json`` of all the numbers.

Expected output on a working setup (the layout is exact; numbers vary with the GPU and
versions; ``x`` marks a digit, and the [build] lines in between come from TensorRT's progress
monitor)::

    [1/6] environment
          tensorrt 10.x.x  torch 2.x+cuXXX  triton 3.x  polygraphy 0.x
          GPU NVIDIA H200 (compute capability 9.0)
    [2/6] export tiny (fp16)
    [3/6] build engines: aot, jit
          aot  built in xx.x s  (model.engine x.x MB)
          jit  built in xx.x s  (model.engine x.x MB)
    [4/6] parity against the fp32 PyTorch model (fp16 tolerances)
          aot  prefill logits ok: max abs x.xe-0x (atol 0.05, rtol 0.02)  kv ok: max abs x.xe-0x
          aot  decode  logits ok: max abs x.xe-0x (atol 0.05, rtol 0.02)  kv ok: max abs x.xe-0x
          jit  prefill logits ok: ...
          jit  decode  logits ok: ...
    [5/6] greedy generation, 2 prompts x 24 tokens
          aot  tokens equal to the torch back end
          jit  tokens equal to the torch back end
    [6/6] timing (median ms)
          back end       prefill 1x128   decode step (past 128)
          torch fp16            x.xx              x.xx
          trt aot               x.xx              x.xx
          trt jit               x.xx              x.xx
    all checks passed

A failing parity line reads ``FAIL`` with the worst element; a greedy mismatch prints the first
step where the tokens differ and the reference's gap between its top two logits there (a gap
below the logits tolerance is a near-tie, reported as such but still counted as a failure).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

PROFILE = "batch=1:2:4,seq=1:32:160,past=0:64:256"
PROMPT_TOKENS = 16
NEW_TOKENS = 4
GREEDY_STEPS = 24
TIMING_TOKENS = 128


def log(text: str = "") -> None:
    print(text, flush=True)


def environment() -> dict:
    """Versions and the GPU; exits 3 with the install hint when something is missing."""
    from importlib import metadata

    from moetrt.errors import MoetrtError
    from moetrt.ops.plugins import device_info, import_tensorrt

    try:
        trt = import_tensorrt("this check")
        gpu = device_info()
    except MoetrtError as exc:
        log(f"      missing: {exc}")
        raise SystemExit(3) from exc
    versions = {"tensorrt": str(trt.__version__)}
    for name in ("torch", "triton", "polygraphy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            log(f"      missing: {name} (pip install 'moetrt[gpu]' polygraphy)")
            raise SystemExit(3) from None
    log("      " + "  ".join(f"{k} {v}" for k, v in versions.items()))
    log(f"      GPU {gpu['name']} (compute capability {gpu['compute_capability']})")
    return {"versions": versions, "gpu": {"name": gpu["name"], "compute_capability": gpu["compute_capability"]}}


def parity_inputs(model, dtype: str, seed: int = 0):
    """(prefill feeds, decode feeds, reference outputs of each, real-position masks), the decode fed the reference cache."""
    import torch

    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (2, PROMPT_TOKENS + NEW_TOKENS), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as batched generation builds it
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    kv_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    with torch.no_grad():
        prefill_ref = model(ids[:, :PROMPT_TOKENS], mask[:, :PROMPT_TOKENS], positions[:, :PROMPT_TOKENS])
        decode_ref = model(ids[:, PROMPT_TOKENS:], mask, positions[:, PROMPT_TOKENS:], prefill_ref.past_key_values)
    empty = torch.zeros(2, cfg.num_key_value_heads, 0, cfg.head_dim, dtype=kv_dtype)
    prefill = {"input_ids": ids[:, :PROMPT_TOKENS].numpy(), "attention_mask": mask[:, :PROMPT_TOKENS].numpy(),
               "position_ids": positions[:, :PROMPT_TOKENS].numpy()}
    decode = {"input_ids": ids[:, PROMPT_TOKENS:].numpy(), "attention_mask": mask.numpy(),
              "position_ids": positions[:, PROMPT_TOKENS:].numpy()}
    for i, (key, value) in enumerate(prefill_ref.past_key_values):
        prefill[f"past_key_values.{i}.key"] = prefill[f"past_key_values.{i}.value"] = empty
        decode[f"past_key_values.{i}.key"], decode[f"past_key_values.{i}.value"] = key.to(kv_dtype), value.to(kv_dtype)
    real = (mask[:, :PROMPT_TOKENS].bool().numpy(), mask[:, PROMPT_TOKENS:].bool().numpy())
    return [("prefill", prefill, prefill_ref, real[0], mask[:, :PROMPT_TOKENS].bool().numpy()),
            ("decode", decode, decode_ref, real[1], mask.bool().numpy())]


def check_parity(backend, model, dtype: str) -> tuple[bool, list[dict]]:
    from moetrt.parity import check_close, tolerance

    ok, rows = True, []
    for name, feeds, ref, real_q, real_kv in parity_inputs(model, dtype):
        out = backend.forward(dict(feeds))
        logits = check_close(out["logits"][real_q], ref.logits.numpy()[real_q], tolerance(dtype, "logits"))
        kv = []
        for i, (key, value) in enumerate(ref.past_key_values):
            for kind, expected in (("key", key), ("value", value)):
                got = out[f"present.{i}.{kind}"].float().cpu().numpy().transpose(0, 2, 1, 3)[real_kv]  # [n, G, Hd]
                kv.append(check_close(got, expected.numpy().transpose(0, 2, 1, 3)[real_kv], tolerance(dtype, "kv")))
        failing = [c for c in kv if not c.ok]
        kv_worst = failing[0] if failing else max(kv, key=lambda c: c.max_abs)
        ok &= logits.ok and kv_worst.ok
        rows.append({"input": name, "logits": str(logits), "kv": str(kv_worst), "ok": logits.ok and kv_worst.ok,
                     "logits_max_abs": logits.max_abs, "kv_max_abs": kv_worst.max_abs})
        tol = logits.tolerance
        log(f"      {backend.info.plugins:4s} {name:7s} logits {'ok' if logits.ok else 'FAIL'}: max abs "
            f"{logits.max_abs:.1e} (atol {tol.atol:g}, rtol {tol.rtol:g})  kv {'ok' if kv_worst.ok else 'FAIL'}: "
            f"max abs {kv_worst.max_abs:.1e}")
    return ok, rows


def check_greedy(session, reference, prompts, dtype: str) -> tuple[bool, dict]:
    from moetrt.parity import tolerance

    got = session.generate(prompts, max_new_tokens=GREEDY_STEPS, stop_tokens=())
    want = reference.generate(prompts, max_new_tokens=GREEDY_STEPS, stop_tokens=())
    if got.tokens == want.tokens:
        log(f"      {session.backend.info.plugins:4s} tokens equal to the torch back end")
        return True, {"equal": True}
    row = next(r for r in range(len(prompts)) if got.tokens[r] != want.tokens[r])
    step = next(s for s, (a, b) in enumerate(zip(got.tokens[row], want.tokens[row])) if a != b)
    # the reference's gap between its top two logits at the diverging step
    import torch

    model = reference.backend.model
    ids = torch.tensor([list(prompts[row]) + want.tokens[row][:step]], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(ids).logits[0, -1].float().cpu()
    top = torch.topk(logits, 2).values
    gap = float(top[0] - top[1])
    near_tie = gap < tolerance(dtype, "logits").atol
    log(f"      {session.backend.info.plugins:4s} tokens DIFFER: prompt {row}, step {step}: engine "
        f"{got.tokens[row][step]}, torch {want.tokens[row][step]}; reference top-2 logit gap {gap:.2e}"
        f"{' (a near-tie)' if near_tie else ''}")
    return False, {"equal": False, "prompt": row, "step": step, "gap": gap, "near_tie": near_tie}


def median_ms(fn, repeat: int = 20, warmup: int = 3) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def timing(backends: dict, vocab: int) -> dict:
    """Prefill 1 x 128 and one decode step on 128 cached tokens, through each back end's forward."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (1, TIMING_TOKENS + 1), dtype=np.int64)
    table = {}
    for name, backend in backends.items():
        prefill = {"input_ids": ids[:, :TIMING_TOKENS], "attention_mask": np.ones((1, TIMING_TOKENS), np.int64),
                   "position_ids": np.arange(TIMING_TOKENS, dtype=np.int64)[None]}
        prefill.update(backend.empty_past(1))
        out = backend.forward(dict(prefill))
        decode = {"input_ids": ids[:, TIMING_TOKENS:], "attention_mask": np.ones((1, TIMING_TOKENS + 1), np.int64),
                  "position_ids": np.array([[TIMING_TOKENS]], np.int64)}
        for key in list(out):
            if key.startswith("present."):
                decode[key.replace("present.", "past_key_values.")] = out[key]
        table[name] = {"prefill_ms": median_ms(lambda b=backend, f=prefill: b.forward(dict(f))),
                       "decode_ms": median_ms(lambda b=backend, f=decode: b.forward(dict(f)))}
    log(f"      {'back end':12s}  prefill 1x{TIMING_TOKENS}   decode step (past {TIMING_TOKENS})")
    for name, row in table.items():
        log(f"      {name:12s}  {row['prefill_ms']:12.2f}   {row['decode_ms']:12.2f}")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="a preset name or checkpoint folder (default: tiny)")
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"), help="export and engine precision")
    parser.add_argument("--plugins", default="aot,jit", help="comma-separated plugin modes to build (default: aot,jit)")
    parser.add_argument("--profile", default=PROFILE, help=f"engine profile (default: {PROFILE})")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.plugins.split(",") if m.strip()]
    warnings.simplefilter("ignore")

    work = args.work or Path(tempfile.mkdtemp(prefix="moetrt-check-trt-"))
    work.mkdir(parents=True, exist_ok=True)
    summary: dict = {"model": args.model, "dtype": args.dtype, "plugins": modes, "profile": args.profile}
    ok = True
    try:
        log("[1/6] environment")
        summary["environment"] = environment()

        import torch

        import moetrt
        from moetrt.export import onnx_from_torch
        from moetrt.optimize.trt import engine_from_onnx
        from moetrt.runtime import Session
        from moetrt.runtime.backend_torch import TorchBackend
        from moetrt.runtime.backend_trt import TrtBackend

        log(f"[2/6] export {args.model} ({args.dtype})")
        model = moetrt.from_pretrained(args.model).float().eval()
        exported = onnx_from_torch(args.model, work / "exported", dtype=args.dtype, overwrite=True, progress=False)

        log(f"[3/6] build engines: {', '.join(modes)}")
        engines = {}
        for mode in modes:
            start = time.perf_counter()
            engines[mode] = engine_from_onnx(exported, work / f"engine-{mode}", precision=args.dtype, plugins=mode,
                                             profile=args.profile, timing_cache=work / "timing.cache",
                                             overwrite=True, progress=True)
            size = (engines[mode] / "model.engine").stat().st_size / 1e6
            log(f"      {mode:4s} built in {time.perf_counter() - start:.1f} s  (model.engine {size:.1f} MB)")
        summary["engines"] = {m: str(p) for m, p in engines.items()}

        log(f"[4/6] parity against the fp32 PyTorch model ({args.dtype} tolerances)")
        backends = {mode: TrtBackend(path) for mode, path in engines.items()}
        summary["parity"] = {}
        for mode, backend in backends.items():
            passed, rows = check_parity(backend, model, args.dtype)
            ok &= passed
            summary["parity"][mode] = rows

        log(f"[5/6] greedy generation, 2 prompts x {GREEDY_STEPS} tokens")
        reference = Session(model, backend="torch", device="cuda")
        rng = np.random.default_rng(1)
        prompts = [rng.integers(3, model.config.vocab_size, 12).tolist(), rng.integers(3, model.config.vocab_size, 7).tolist()]
        summary["greedy"] = {}
        for mode, backend in backends.items():
            passed, row = check_greedy(Session(backend), reference, prompts, args.dtype)
            ok &= passed
            summary["greedy"][mode] = row

        log("[6/6] timing (median ms)")
        timed = {f"torch {args.dtype}": TorchBackend(moetrt.from_pretrained(args.model).to(
            {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]), device="cuda")}
        timed.update({f"trt {mode}": backend for mode, backend in backends.items()})
        summary["timing"] = timing(timed, model.config.vocab_size)
    finally:
        summary["ok"] = ok
        (work / "check_tensorrt.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        if args.work is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif args.keep or args.work:
            log(f"      results in {work / 'check_tensorrt.json'}")
    log("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
