"""optimize(): a canonical export -> an optimized folder per target, with its metadata, its I/O
contract, its requirement checks, and the ``moetrt optimize`` subcommand."""

from __future__ import annotations

import argparse
import json

import onnx
import onnx_ir as ir
import pytest

from moetrt.artifact import sha256_file
from moetrt.errors import BackendMissingError, MoetrtError, UnsupportedModelError
from moetrt.optimize import optimize
from moetrt.optimize import cli as optimize_cli
from tests.optimize.helpers import compare, node_counts, session

ort = pytest.importorskip("onnxruntime")

# (options, the passes expected in moetrt.json, node counts in the optimized graph; tiny has 4 MoE layers;
# group_attention is ort-cpu's default)
VARIANTS = [
    (dict(), ["group_attention", "lower_moe"], {"com.microsoft::MoE": 4, "If": 4}),
    (dict(moe_lowering="always"), ["group_attention", "lower_moe"], {"com.microsoft::MoE": 4, "moetrt::SparseMoE": 0}),
    (dict(quantize_experts="int4"), ["group_attention", "quantize_experts_int4", "lower_moe"], {"com.microsoft::QMoE": 4}),
    (dict(quantize_experts="int8"), ["group_attention", "quantize_experts_int8", "lower_moe"], {"com.microsoft::QMoE": 4}),
    (dict(precision="fp16"), ["convert_precision_fp16", "group_attention", "lower_moe"],
     {"moetrt::SparseMoE": 4, "com.microsoft::MoE": 0}),
    (dict(moe_lowering="off"), ["group_attention"], {"moetrt::SparseMoE": 4, "com.microsoft::MoE": 0}),
    (dict(group_attention=False), ["lower_moe"], {"com.microsoft::MoE": 4, "If": 4}),
]


@pytest.fixture(scope="module")
def optimized(canonical, tmp_path_factory):
    cache = {}

    def get(**options):
        key = tuple(sorted(options.items()))
        if key not in cache:
            model, folder = canonical("tiny")
            out = tmp_path_factory.mktemp("optimized") / "out"
            optimize(folder, out, progress=False, **options)
            cache[key] = (model, folder, out)
        return cache[key]

    return get


@pytest.mark.parametrize("options,passes,nodes", VARIANTS, ids=lambda v: str(v) if isinstance(v, dict) else None)
def test_folder_metadata_and_contract(optimized, options, passes, nodes):
    _, src, out = optimized(**options)
    meta = json.loads((out / "moetrt.json").read_text())
    source = json.loads((src / "moetrt.json").read_text())
    assert meta["format"] == "moetrt-onnx" and meta["format_version"] == source["format_version"]
    assert meta["export"]["target"] == "ort-cpu"
    precision = options.get("precision", "fp32")
    assert meta["export"]["dtype"] == precision
    assert meta["config"] == source["config"]
    opt = meta["optimize"]
    assert [p["name"] for p in opt["passes"]] == passes
    assert opt["target"] == "ort-cpu" and opt["quantize_experts"] == options.get("quantize_experts")
    if "quantize_experts" in options:  # int8 activations by default on ort-cpu
        (quantized,) = [p for p in opt["passes"] if p["name"].startswith("quantize_experts")]
        assert opt["expert_activations"] == "int8" and quantized["details"]["accuracy_level"] == 4
    assert opt["runtime_checked"]["onnxruntime"] == ort.__version__
    for name, digest in meta["files"].items():
        assert sha256_file(out / name) == digest, name
    assert "tokenizer.json" in meta["files"]
    # the I/O contract: same names and axes, KV in the output precision, logits float32
    kv = {"fp32": "float32", "fp16": "float16"}[precision]
    for side in ("inputs", "outputs"):
        assert [t["name"] for t in meta["io"][side]] == [t["name"] for t in source["io"][side]]
        for new, old in zip(meta["io"][side], source["io"][side]):
            assert new["shape"] == old["shape"]
            want = kv if new["name"].startswith(("past_", "present")) else old["dtype"]
            assert new["dtype"] == want, new
    assert meta["io"]["state"] == source["io"]["state"]  # the per-layer state contract travels with the graph
    graph = ir.load(out / "model.onnx")
    counts = node_counts(graph)
    for op, count in nodes.items():
        assert counts[op] == count, (op, counts)
    assert meta["export"]["nodes"] == {k: v for k, v in counts.items() if "::" in k and v}


@pytest.mark.parametrize("options", [dict(), dict(moe_lowering="always"), dict(quantize_experts="int4"),
                                     dict(precision="fp16")], ids=str)
def test_runtime_runs_it_unchanged(optimized, options):
    """moetrt's Session runs the optimized folder. fp32 folders decode the canonical export's greedy
    tokens; int4 and fp16 change the numbers (checked against their bounds in their pass tests)."""
    from moetrt.runtime import Session

    _, src, out = optimized(**options)
    prompt = [1, 70, 101, 32, 114, 101, 116]
    got = Session(out, backend="ort").generate([prompt], max_new_tokens=12, stop_tokens=()).tokens[0]
    assert len(got) == 12 and all(0 <= t < 512 for t in got)
    if "quantize_experts" not in options and "precision" not in options:
        want = Session(src, backend="ort").generate([prompt], max_new_tokens=12, stop_tokens=()).tokens[0]
        assert got == want


def test_default_matches_reference_in_prefill_and_decode(optimized):
    model, _, out = optimized()
    sess = session(out / "model.onnx")
    for batch, seq, past in [(1, 1, 0), (1, 1, 40), (2, 33, 0), (4, 1, 12)]:
        logits, kv, _ = compare(model, sess, batch, seq, past)
        assert logits.ok and kv.ok, (batch, seq, past, logits, kv)


# --- errors, all before any heavy work -----------------------------------------------------------
def test_trt_target_builds_an_engine_or_says_what_is_missing(canonical, tmp_path, monkeypatch):
    """--target trt goes to the TensorRT engine build; without TensorRT that is a clear error."""
    import builtins

    _, src = canonical("tiny")
    real_import = builtins.__import__

    def no_tensorrt(name, *args, **kwargs):
        if name == "tensorrt" or name.startswith("tensorrt."):
            raise ImportError("No module named 'tensorrt'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorrt)
    with pytest.raises(BackendMissingError, match="pip install tensorrt"):
        optimize(src, tmp_path / "out", "trt", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(MoetrtError, match="profile apply to target 'trt' / 'trt-rtx' only") as err:
        optimize(src, tmp_path / "out", "ort-cpu", profile="batch=1:1:1", progress=False)
    assert err.value.for_cli() == "--profile apply to --target trt / trt-rtx only"


@pytest.mark.parametrize("kwargs,match", [
    (dict(target="cpu"), "unknown target 'cpu'; choose one of ort-cpu, ort-cuda, trt"),
    (dict(precision="fp8"), "unknown precision 'fp8'"),
    (dict(quantize_experts="int2"), "unknown expert quantization 'int2'; choose one of int8, int4"),
    (dict(moe_lowering="sometimes"), "unknown moe_lowering"),
    (dict(block_size=24), "block_size must be a power of two >= 16"),
    (dict(expert_activations="int4"), "unknown expert_activations 'int4'; choose one of int8, fp32"),
])
def test_bad_options(canonical, tmp_path, kwargs, match):
    _, src = canonical("tiny")
    with pytest.raises(MoetrtError, match=match):
        optimize(src, tmp_path / "out", progress=False, **kwargs)


def test_cuda_target_needs_the_cuda_provider(canonical, tmp_path):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has ONNX Runtime's CUDA execution provider")
    _, src = canonical("tiny")
    with pytest.raises(MoetrtError, match="target='ort-cuda' needs ONNX Runtime's CUDAExecutionProvider.*onnxruntime-gpu"):
        optimize(src, tmp_path / "out", "ort-cuda", precision="fp16", progress=False)
    assert not (tmp_path / "out").exists()


def test_old_onnxruntime_is_named(canonical, tmp_path, monkeypatch):
    _, src = canonical("tiny")
    monkeypatch.setattr(ort, "__version__", "1.22.0")
    with pytest.raises(MoetrtError, match=r"needs ONNX Runtime >= 1\.23\.1 .*has 1\.22\.0"):
        optimize(src, tmp_path / "out", progress=False)


def test_missing_onnxruntime_is_named(canonical, tmp_path, monkeypatch):
    import sys

    _, src = canonical("tiny")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    with pytest.raises(BackendMissingError, match="pip install 'onnxruntime>=1.23.1'"):
        optimize(src, tmp_path / "out", progress=False)


def test_cuda_folder_built_without_the_runtime_check(canonical, tmp_path):
    """check_runtime=False builds an ort-cuda folder here: fp16 layers become MoE (always), fp32 would not."""
    _, src = canonical("tiny")
    out = optimize(src, tmp_path / "cuda", "ort-cuda", precision="fp16", check_runtime=False, progress=False)
    meta = json.loads((out / "moetrt.json").read_text())
    assert meta["optimize"]["runtime_checked"] is None and meta["optimize"]["moe_lowering"] == "always"
    assert meta["optimize"]["execution_provider"] == "CUDAExecutionProvider"
    counts = node_counts(ir.load(out / "model.onnx"))
    assert counts["com.microsoft::MoE"] == 4 and counts["If"] == 0 and counts["moetrt::SparseMoE"] == 0
    bf16 = optimize(src, tmp_path / "cuda-bf16-int4", "ort-cuda", precision="bf16", quantize_experts="int4",
                    check_runtime=False, progress=False)
    onnx.checker.check_model(str(bf16 / "model.onnx"), full_check=True)
    graph = ir.load(bf16 / "model.onnx")
    qmoe = [n for n in graph.graph if n.op_type == "QMoE"]
    assert len(qmoe) == 4 and all("accuracy_level" not in n.attributes for n in qmoe)  # a CPU-only attribute
    for node in qmoe:
        x, logits, _, fc1_scales = node.inputs[:4]
        assert x.dtype == fc1_scales.dtype == logits.dtype == ir.DataType.BFLOAT16
        assert logits.producer().op_type == "Cast" and logits.producer().inputs[0].dtype == ir.DataType.FLOAT
    fp32 = optimize(src, tmp_path / "cuda32", "ort-cuda", check_runtime=False, progress=False)
    passes = json.loads((fp32 / "moetrt.json").read_text())["optimize"]["passes"]
    assert passes[0]["count"] == 0 and all("float16, bfloat16" in why for why in passes[0]["skipped"].values())


def test_sources_it_refuses(optimized, canonical, tmp_path):
    _, src, out = optimized()
    with pytest.raises(MoetrtError, match="optimize starts from the canonical export"):
        optimize(out, tmp_path / "again", progress=False)
    with pytest.raises(MoetrtError, match="already exists; choose another folder or pass overwrite=True"):
        optimize(src, out, progress=False)
    with pytest.raises(MoetrtError, match="has no moetrt.json"):
        optimize(tmp_path, tmp_path / "x", progress=False)
    _, fp16 = canonical("tiny", dtype="fp16")
    with pytest.raises(UnsupportedModelError, match="converted from fp32 exports only"):
        optimize(fp16, tmp_path / "bf16", precision="bf16", progress=False)


def test_overwrite_replaces_the_folder(optimized, canonical, tmp_path):
    _, src = canonical("tiny")
    out = optimize(src, tmp_path / "o", moe_lowering="off", progress=False)
    optimize(src, out, quantize_experts="int4", overwrite=True, progress=False)
    assert json.loads((out / "moetrt.json").read_text())["optimize"]["quantize_experts"] == "int4"


# --- the subcommand ------------------------------------------------------------------------------------
def _parse(argv):
    parser = argparse.ArgumentParser(prog="moetrt optimize")
    optimize_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_runs_the_library_function(canonical, tmp_path, capsys):
    _, src = canonical("tiny")
    out = tmp_path / "cli"
    args = _parse([str(src), "--target", "ort-cpu", "-o", str(out), "--quantize-experts", "int4", "-q",
                   "--expert-activations", "fp32"])
    assert optimize_cli.run(args) == 0
    assert capsys.readouterr().out.strip() == str(out)
    meta = json.loads((out / "moetrt.json").read_text())
    assert meta["optimize"]["quantize_experts"] == "int4" and meta["optimize"]["block_size"] == 32
    assert meta["optimize"]["expert_activations"] == "fp32"
    levels = {n.attributes["accuracy_level"].value for n in ir.load(out / "model.onnx").graph if n.op_type == "QMoE"}
    assert levels == {0}


def test_cli_options():
    args = _parse(["d", "-t", "ort-cuda", "-o", "o", "--precision", "bf16", "--moe-lowering", "off", "--overwrite",
                   "--no-check-runtime", "--block-size", "64", "--expert-activations", "fp32"])
    assert (args.target, args.precision, args.moe_lowering, args.overwrite, args.no_check_runtime, args.block_size,
            args.expert_activations) == ("ort-cuda", "bf16", "off", True, True, 64, "fp32")
    # --group-attention: None lets optimize() choose per target (on for ort-cpu), --no-group-attention turns it off
    assert [_parse(["d", "-t", "ort-cpu", "-o", "o", *flag]).group_attention
            for flag in ([], ["--group-attention"], ["--no-group-attention"])] == [None, True, False]
    with pytest.raises(SystemExit):
        _parse(["d", "-o", "o"])  # --target is required


def test_cli_trt_error_names_the_fix(canonical, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed: the engine build is tested in test_trt_build.py")
    _, src = canonical("tiny")
    with pytest.raises(BackendMissingError, match="pip install tensorrt"):
        optimize_cli.run(_parse([str(src), "-t", "trt", "-o", str(tmp_path / "x"), "-q"]))
    assert not (tmp_path / "x").exists()

