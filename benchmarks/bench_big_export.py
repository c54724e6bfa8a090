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

   ``--family gpt_oss``: gpt-oss-120b's dimensions instead (hidden 2880, expert ffn 2880, 128
   experts, top-4, 64 heads, 8 KV heads, head_dim 64, sliding/full attention alternating, YaRN
   RoPE, sinks, every bias, vocab 201088), the experts stored as released: MXFP4
   ``mlp.experts.{gate_up,down}_proj_blocks`` ``[E, R, G, 16]`` / ``_scales`` ``[E, R, G]``
   uint8 (random block bytes, scale bytes 120..127), the rest bf16, ``quantization_config``
   ``{"quant_method": "mxfp4"}``. The export dequantizes the experts to bf16, so it is ~3x the
   checkpoint (one layer: 1.7 GB MXFP4 -> 6.4 GB; one stacked gate/up 4.2 GB); by default the
   layer count is the fewest whose export exceeds this machine's RAM by 5% (4 on 24 GiB: 9.3 GB
   checkpoint, 28 GB export). The spot checks compare experts with ``dequantize_mxfp4`` of the
   stored bytes. Its numbers are a section of their own in the report.
2. **bench-small** (the preset of benchmarks/bench_runtime_cpu.py, random weights seeded 0,
   fp32, 1.4 GB): peak memory of ``moetrt export`` from its checkpoint folder (streaming), from
   the model in memory (the preset name), and of transformers' own exporter on the same
   checkpoint (``AutoModelForCausalLM.from_pretrained`` + ``OnnxExporter().export_for_generation``,
   driven as bench_runtime_cpu.py drives it), each in its own child process, ``--repeat`` times.

Peak memory is the child's "Maximum resident set size" from GNU time (``/usr/bin/time -v``;
Debian package ``time``); where that is missing, ``resource.getrusage(RUSAGE_CHILDREN)`` after
the child exits (the report says which). Run one at a time on an otherwise quiet machine:
memory is what it is, but wall times move with the load.

    python benchmarks/bench_big_export.py [--family mixtral|gpt_oss] [--layers N] [--repeat 3] [--work DIR]
                                          [--keep] [--skip-big] [--skip-small] [--out benchmarks/results]

Writes ``big_export.json`` and ``big_export.md``. The synthetic checkpoint and its export are
deleted at the end unless ``--keep`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
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
# gpt-oss-120b's dimensions (its config.json), the experts in MXFP4 as released; the layer count
# is the benchmark's knob (by default the fewest whose bf16 export exceeds this machine's RAM)
GPT_OSS_CONFIG = dict(
    model_type="gpt_oss", architectures=["GptOssForCausalLM"], vocab_size=201088, hidden_size=2880,
    intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=128,
    num_experts_per_tok=4, experts_per_token=4, hidden_act="silu", attention_bias=True,
    max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=150000.0,
    rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                  "original_max_position_embeddings": 4096},
    sliding_window=128, swiglu_limit=7.0, tie_word_embeddings=False, eos_token_id=200002, pad_token_id=199999,
    quantization_config={"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
    torch_dtype="bfloat16",
)
FAMILIES = {"mixtral": BIG_CONFIG, "gpt_oss": GPT_OSS_CONFIG}
DEFAULT_LAYERS = {"mixtral": 9}  # gpt_oss: computed from the machine's RAM (layers_beyond_ram)
RAM_MARGIN = 1.05  # the computed layer count makes the export at least 5% larger than RAM
TARGET_RSS_GB = 4.0
_SAFETENSORS_DTYPE = {torch.bfloat16: "BF16", torch.uint8: "U8"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {message}", flush=True)


# --- the synthetic checkpoint -------------------------------------------------------------------

def big_config(family: str, layers: int) -> dict:
    """config.json of the synthetic checkpoint: ``family``'s dimensions, ``layers`` layers."""
    cfg = dict(FAMILIES[family], num_hidden_layers=layers)
    if family == "gpt_oss":  # sliding and full attention alternate, sliding first, as in the released models
        cfg["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    return cfg


def big_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every tensor of the checkpoint, in Hugging Face's on-disk layout."""
    if cfg["model_type"] == "gpt_oss":
        return _gpt_oss_tensors(cfg)
    return [(name, shape, torch.bfloat16) for name, shape in _mixtral_tensors(cfg)]


def _mixtral_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
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


def _gpt_oss_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """openai/gpt-oss's tensors: bf16 everywhere but the experts' MXFP4 ``*_blocks`` / ``*_scales`` (uint8)."""
    d, f, v, e = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_local_experts"]
    heads, hd = cfg["num_attention_heads"], cfg["head_dim"]
    q, kv = heads * hd, cfg["num_key_value_heads"] * hd
    bf, u8 = torch.bfloat16, torch.uint8
    out = [("model.embed_tokens.weight", (v, d), bf)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [(f"{p}.input_layernorm.weight", (d,), bf), (f"{p}.post_attention_layernorm.weight", (d,), bf)]
        for proj, rows, cols in (("q", q, d), ("k", kv, d), ("v", kv, d), ("o", d, q)):
            out += [(f"{p}.self_attn.{proj}_proj.weight", (rows, cols), bf),
                    (f"{p}.self_attn.{proj}_proj.bias", (rows,), bf)]
        out += [(f"{p}.self_attn.sinks", (heads,), bf),
                (f"{p}.mlp.router.weight", (e, d), bf), (f"{p}.mlp.router.bias", (e,), bf)]
        # [E, R, G, 16] blocks and [E, R, G] scales: R output rows (gate/up interleaved), G * 32 inputs
        for proj, rows, cols in (("gate_up_proj", 2 * f, d), ("down_proj", d, f)):
            out += [(f"{p}.mlp.experts.{proj}_blocks", (e, rows, cols // 32, 16), u8),
                    (f"{p}.mlp.experts.{proj}_scales", (e, rows, cols // 32), u8),
                    (f"{p}.mlp.experts.{proj}_bias", (e, rows), bf)]
    out += [("model.norm.weight", (d,), bf), ("lm_head.weight", (v, d), bf)]
    return out


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return torch.Size(shape).numel() * dtype.itemsize


def export_bytes(cfg: dict) -> int:
    """Bytes of the bf16 export's weights: every parameter of the model ``cfg`` describes, two bytes each."""
    from moetrt.checkpoint import config_from_hf
    from moetrt.model import MoETransformer

    with torch.device("meta"):
        model = MoETransformer(config_from_hf(cfg))
    return sum(p.numel() for p in model.parameters()) * 2


def layers_beyond_ram(family: str) -> int:
    """The fewest layers whose bf16 export exceeds this machine's RAM by :data:`RAM_MARGIN`."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    one, two = export_bytes(big_config(family, 1)), export_bytes(big_config(family, 2))
    per_layer, rest = two - one, 2 * one - two  # the export grows linearly with the layers
    return max(1, math.floor((RAM_MARGIN * ram - rest) / per_layer) + 1)


def _tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if name.endswith("_blocks"):  # any byte is two valid e2m1 values
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    if name.endswith("_scales"):  # e8m0 exponents -7..0 (bias 127): dequantized magnitudes up to 6
        return torch.randint(120, 128, shape, dtype=torch.uint8, generator=generator)
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=generator)


def write_checkpoint(folder: Path, cfg: dict) -> int:
    """A sharded safetensors checkpoint, each tensor generated and written on its own; returns its bytes."""
    folder.mkdir(parents=True)
    tensors = big_tensors(cfg)
    shards, current, size = [], [], 0
    for name, shape, dtype in tensors:
        nbytes = _nbytes(shape, dtype)
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape, dtype))
        size += nbytes
    shards.append(current)
    weight_map, total, seed = {}, 0, 0
    for index, shard in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in shard:
            nbytes = _nbytes(shape, dtype)
            header[name] = {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(folder / file, "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            for name, shape, dtype in shard:
                seed += 1
                f.write(memoryview(_tensor(name, shape, dtype, seed).view(torch.uint8).numpy()))
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
    """Spot checks: initializers of the export against the checkpoint tensors they come from.

    gpt-oss experts against :func:`moetrt.mxfp4.dequantize_mxfp4` of the stored bytes, the gate/up
    rows de-interleaved here (gate rows at even indices) rather than by the family's transform.
    """
    import ml_dtypes
    import numpy as np
    import onnx_ir as ir

    from moetrt.checkpoint import read_safetensors_header
    from moetrt.mxfp4 import dequantize_mxfp4

    stored = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        stored.update({t.name: t for t in read_safetensors_header(shard)})
    model = ir.load(export / "model.onnx")
    inits = model.graph.initializers
    f, last = cfg["intermediate_size"], cfg["num_hidden_layers"] - 1

    def bf16(tensor):
        return tensor.contiguous().view(torch.uint16).numpy().view(ml_dtypes.bfloat16)

    def ckpt(name):
        return bf16(stored[name].read())

    def onnx_slice(name, index):
        value = inits[name].const_value.numpy()[index]  # memory-mapped: only this slice is read
        return np.ascontiguousarray(value)

    def dequantized(name, expert):  # one expert's [R, G * 32] in bf16, from the stored MXFP4 bytes
        return dequantize_mxfp4(stored[f"{name}_blocks"].select(expert).read(),
                                stored[f"{name}_scales"].select(expert).read(), torch.bfloat16)

    checks = {}
    if cfg["model_type"] == "gpt_oss":
        for layer in (0, last):
            p = f"model.layers.{layer}.mlp.experts"
            for expert in (0, cfg["num_local_experts"] - 1):
                gate_up = dequantized(f"{p}.gate_up_proj", expert)  # [2F, D], gate and up rows interleaved
                checks[f"layer {layer} expert {expert} gate rows (MXFP4)"] = np.array_equal(
                    onnx_slice(f"{p}.gate_up_proj", (expert, slice(0, f))), bf16(gate_up[0::2]))
                checks[f"layer {layer} expert {expert} up rows (MXFP4)"] = np.array_equal(
                    onnx_slice(f"{p}.gate_up_proj", (expert, slice(f, 2 * f))), bf16(gate_up[1::2]))
                checks[f"layer {layer} expert {expert} down (MXFP4)"] = np.array_equal(
                    onnx_slice(f"{p}.down_proj", expert), bf16(dequantized(f"{p}.down_proj", expert)))
            bias = ckpt(f"{p}.gate_up_proj_bias")  # [E, 2F] interleaved
            checks[f"layer {layer} gate_up bias"] = np.array_equal(onnx_slice(f"{p}.gate_up_proj_bias", slice(None)),
                                                                   np.concatenate((bias[:, 0::2], bias[:, 1::2]), 1))
            checks[f"layer {layer} down bias"] = np.array_equal(
                onnx_slice(f"{p}.down_proj_bias", slice(None)), ckpt(f"{p}.down_proj_bias"))
    else:
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
        + ("" if not report.get("kept_from_earlier_runs") else " (" + "; ".join(
            f"{k} section from the run of {d}" for k, d in report["kept_from_earlier_runs"].items()) + ")")
        + "; "
        "the machine was shared with other jobs (wall times move with the load, memory does not).",
        "",
    ]
    for family in FAMILIES:
        big = report.get(big_section_name(family))
        if big:
            lines += _big_lines(big, m)
    small = report.get("small")
    if small:
        lines += [
            f"## bench-small ({small['weight_gb']:.2f} GB fp32): peak memory of the exporters",
            "",
            f"Medians of {report['small'].get('repeat', report['repeat'])} runs, each in a fresh process.",
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
              "one and keeps the other's recorded numbers; `--family gpt_oss --skip-small` measures the gpt-oss "
              "checkpoint and keeps the rest). This report: `" + report["command"] + "`", ""]
    (out / "big_export.md").write_text("\n".join(lines))


def big_section_name(family: str) -> str:
    """The report's key for the big run of ``family`` (``big``: Mixtral, as first recorded)."""
    return "big" if family == "mixtral" else f"big_{family}"


def _big_lines(big: dict, m: dict) -> list[str]:
    """The markdown section of one big run."""
    run, cfg = big["export"], big["config"]
    if big.get("family", "mixtral") == "gpt_oss":
        title = "## Big: synthetic gpt-oss checkpoint (MXFP4 experts), streamed export"
        what = (f"{big['layers']} layers of gpt-oss-120b's dimensions (hidden 2880, expert ffn 2880, 128 experts, "
                "top-4, 64 heads, 8 KV heads, head_dim 64, sliding/full attention alternating, YaRN RoPE, sinks, "
                f"every bias; vocab {cfg['vocab_size']}), the experts stored as MXFP4 `*_blocks` / `*_scales` "
                "(random block bytes, scale bytes 120..127), everything else bf16: "
                f"{big['checkpoint_gb']:.1f} GB in {big['shards']} shards; exported as bf16 with the experts "
                "dequantized (`onnx_from_torch(folder, out, dtype=\"bf16\")`, streaming). ")
        checks = "spot checks equal to `dequantize_mxfp4` of the checkpoint (gate/up de-interleaved)"
    else:
        title = "## Big: synthetic Mixtral checkpoint, streamed export"
        what = (f"{big['layers']} layers of Mixtral-8x7B's dimensions (hidden 4096, ffn 14336, 8 experts), bf16, "
                f"{big['checkpoint_gb']:.1f} GB in {big['shards']} shards; exported as bf16 "
                "(`onnx_from_torch(folder, out, dtype=\"bf16\")`, streaming). ")
        checks = "spot checks equal to the checkpoint"
    what += (f"Largest checkpoint tensor {big['largest_tensor_gb']:.3f} GB; largest stacked initializer "
             f"{big['largest_initializer_gb']:.2f} GB")
    what += f" (one expert's gate/up piece {big['expert_piece_gb']:.3f} GB)." if "expert_piece_gb" in big else "."
    lines = [
        title, "", what, "",
        "| what | value |",
        "|---|---|",
        f"| checkpoint write | {big['write_s']:.0f} s |",
        f"| export wall time | {fmt(run['wall_s'], '.0f')} s |",
        f"| export peak RSS | {fmt(run.get('peak_rss_gb'), '.2f')} GB (target < {TARGET_RSS_GB:.0f} GB: "
        f"{'met' if (run.get('peak_rss_gb') or 1e9) < TARGET_RSS_GB else 'NOT met'}) |",
        f"| machine RAM | {m['memory']} |",
        f"| export size | {fmt(big.get('export_gb'), '.1f')} GB |",
        f"| {checks} | {big.get('verify', {}).get('all_equal')} |",
        "",
    ]
    if big.get("verify", {}).get("checks") and big.get("family", "mixtral") != "mixtral":
        lines += ["Spot checks: " + ", ".join(f"{k} {'equal' if ok else 'DIFFERENT'}"
                                              for k, ok in big["verify"]["checks"].items()) + ".", ""]
    if run.get("stages_s"):
        lines += ["Stages (s): " + ", ".join(f"{k} {val:.0f}" for k, val in run["stages_s"].items()), ""]
    if big.get("note"):  # what a reader of the numbers must know, added to the JSON by whoever ran it
        lines += [big["note"], ""]
    if run.get("error"):
        lines += ["Export failed:", "", "```", run["error"][-1500:], "```", ""]
    return lines


def _rss_table(what: str, entries: dict) -> list[str]:
    """Markdown rows: median / max peak RSS, median wall time and successful runs of each entry."""
    rows = [f"| {what} | median peak RSS (GB) | max (GB) | median wall (s) | runs ok |", "|---|---|---|---|---|"]
    for name, entry in entries.items():
        s = entry["summary"]
        rows.append(f"| {name} | {fmt(s['median_peak_rss_gb'], '.2f')} | {fmt(s['max_peak_rss_gb'], '.2f')} | "
                    f"{fmt(s['median_wall_s'], '.0f')} | {s['ok']}/{s['runs']} |")
    return rows


def _public_args(argv: list[str]) -> list[str]:
    """The command line as the report shows it: without --work (a folder of this machine)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--work":
            skip = True
        elif not arg.startswith("--work="):
            out.append(arg)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="mixtral",
                        help="the big checkpoint: Mixtral-8x7B's dimensions in bf16, or gpt-oss-120b's with MXFP4 "
                             "experts (default mixtral)")
    parser.add_argument("--layers", type=int, default=None,
                        help="layers of the big checkpoint (default: 9 for mixtral, 26.6 GB; for gpt_oss the fewest "
                             "whose bf16 export exceeds this machine's RAM by 5%%)")
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
        "repeat": args.repeat, "command": "python benchmarks/bench_big_export.py " + " ".join(_public_args(argv or sys.argv[1:])),
    }
    big_section = big_section_name(args.family)
    previous = args.out / "big_export.json"
    if previous.exists():  # a section this run does not measure keeps its last recorded numbers
        with contextlib.suppress(json.JSONDecodeError):
            old = json.loads(previous.read_text())
            measures = {"small": not args.skip_small, big_section: not args.skip_big}
            for section in ("small", *map(big_section_name, FAMILIES)):
                if not measures.get(section) and section in old:
                    report[section] = old[section]
                    if section == "small":  # the runs it took, not this run's --repeat
                        report[section].setdefault("repeat", old.get("repeat", args.repeat))
                    dated = old.get("kept_from_earlier_runs", {}).get(section, old.get("date"))
                    report.setdefault("kept_from_earlier_runs", {})[section] = dated
    try:
        if not args.skip_big:
            layers = args.layers or DEFAULT_LAYERS.get(args.family) or layers_beyond_ram(args.family)
            cfg = big_config(args.family, layers)
            tensors = big_tensors(cfg)
            need, exported = sum(_nbytes(s, dt) for _, s, dt in tensors), export_bytes(cfg)
            free = shutil.disk_usage(work).free
            if free < need + exported + 5 * 10**9:
                raise SystemExit(f"{work} has {free / 1e9:.0f} GB free; the checkpoint and its export need "
                                 f"{(need + exported) / 1e9:.0f} GB (+5 GB margin): pass --work on a larger disk or "
                                 "fewer --layers")
            log(f"{args.family}, {layers} layers: checkpoint {need / 1e9:.1f} GB, export {exported / 1e9:.1f} GB")
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
                "family": args.family, "layers": layers, "config": cfg, "checkpoint_gb": need / 1e9,
                "write_s": write_s, "shards": len(list(checkpoint.glob("*.safetensors"))),
                "largest_tensor_gb": max(_nbytes(s, dt) for _, s, dt in tensors) / 1e9,
                "largest_initializer_gb": 2 * cfg["num_local_experts"] * cfg["intermediate_size"] * cfg["hidden_size"] * 2 / 1e9,
                "expert_piece_gb": 2 * cfg["intermediate_size"] * cfg["hidden_size"] * 2 / 1e9,
                "export": run,
            }
            if run["returncode"] == 0:
                big["export_gb"] = sum(p.stat().st_size for p in export.iterdir()) / 1e9
                big["verify"] = verify_big(checkpoint, export, cfg)
                log(f"spot checks: {big['verify']['checks']}")
            report[big_section] = big
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
