"""Reports (JSON schema, Markdown, PNG) and the ``moetrt parity`` command line (exit codes, overrides)."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest

from moetrt.errors import MoetrtError
from moetrt.parity import SCHEMA, SCHEMA_VERSION, compare
from moetrt.parity.cli import add_arguments, main, run

from . import broken

pytest.importorskip("polygraphy")
pytest.importorskip("onnxruntime")

# the documented schema (parity/report.py): a key removed or renamed must bump SCHEMA_VERSION
TOP_KEYS = {"schema", "schema_version", "passed", "reference", "artifact", "dtype", "tolerances", "inputs", "versions",
            "backends"}
BACKEND_KEYS = {"backend", "passed", "failures", "first_failure", "checkpoints", "missing_checkpoints", "layers",
                "router", "generation"}
CHECKPOINT_KEYS = {"name", "point", "layer", "kind", "tolerance_kind", "max_abs", "max_rel", "atol", "rtol", "passed"}
FIRST_FAILURE_KEYS = {"checkpoint", "layer", "kind", "max_abs", "atol", "rtol", "message"}
LAYER_KEYS = {"layer", "moe", "passed", "max_abs", "worst_checkpoint", "router_agreement"}
ROUTER_KEYS = {"layer", "tokens", "agreement", "matches", "near_ties", "failures", "passed", "events"}
GENERATION_KEYS = {"steps", "prompt", "reference_tokens", "artifact_tokens", "agreement", "diverged_at", "explanation",
                   "near_ties", "router_failures", "passed", "message"}


def strict_json(text: str):
    def reject(constant):
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=reject)


@pytest.fixture(scope="module")
def failing_report(parity_export, tmp_path_factory):
    """A report (and its folder) of the tiny export with swapped gate/up halves in layer 3."""
    import onnx

    model, folder = parity_export("tiny")
    out = tmp_path_factory.mktemp("report") / "onnx"
    shutil.copytree(folder, out)
    proto = onnx.load(str(out / "model.onnx"))
    broken.swap_gate_up(proto, 3)
    onnx.save(proto, str(out / "model.onnx"))
    report_dir = out.parent / "report"
    return compare(model, out, steps=4, report_dir=report_dir), report_dir


def test_json_report_follows_the_schema(failing_report):
    report, folder = failing_report
    data = strict_json((folder / "report.json").read_text())
    assert data == strict_json(report.to_json())
    assert (data["schema"], data["schema_version"]) == (SCHEMA, SCHEMA_VERSION) == ("moetrt.parity.report", 1)
    assert set(data) == TOP_KEYS and data["passed"] is False and data["dtype"] == "fp32"
    assert set(data["tolerances"]["logits"]) == {"atol", "rtol", "reason"}
    backend = data["backends"]["ort"]
    assert set(backend) == BACKEND_KEYS
    assert set(backend["first_failure"]) == FIRST_FAILURE_KEYS
    assert backend["first_failure"]["checkpoint"] == "layers.3.experts" and backend["first_failure"]["layer"] == 3
    assert all(set(c) == CHECKPOINT_KEYS for c in backend["checkpoints"])
    assert [row["layer"] for row in backend["layers"]] == [0, 1, 2, 3]
    assert all(set(row) == LAYER_KEYS for row in backend["layers"])
    assert [row["passed"] for row in backend["layers"]] == [True, True, True, False]
    assert all(set(r) == ROUTER_KEYS for r in backend["router"])
    assert set(backend["generation"]) == GENERATION_KEYS


def test_markdown_and_plot(failing_report):
    _, folder = failing_report
    markdown = (folder / "report.md").read_text()
    assert markdown.startswith("# Parity report: FAIL")
    assert "first divergence: layer 3 experts (layers.3.experts)" in markdown
    assert "| 3 | MoE |" in markdown and "| logits |" in markdown and "## Tolerances" in markdown
    png = (folder / "parity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_plot_legends_hide_no_bars(failing_report):
    """Every legend sits beside its axes: the router bars reach 1.0, where a legend inside would cover them."""
    report, _ = failing_report
    fig = report.figure()
    fig.canvas.draw()
    legends = [(ax, ax.get_legend()) for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 2
    for ax, legend in legends:
        assert not legend.get_window_extent().overlaps(ax.get_window_extent()), ax.get_title()


def parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_passes_with_exit_code_0(parity_export, tmp_path, capsys):
    _, folder = parity_export("tiny")
    assert run(parse(["tiny", str(folder), "-n", "3", "--report", str(tmp_path / "rep")])) == 0
    out = capsys.readouterr().out
    assert "[ort] PASS (fp32" in out and out.strip().endswith("PASS")
    assert strict_json((tmp_path / "rep" / "report.json").read_text())["passed"] is True


def test_cli_fails_with_exit_code_4(failing_report, capsys):
    """4, not 1: a CI step tells a failed check from a crash (1) and an input to fix (2)."""
    _, folder = failing_report
    assert run(parse(["tiny", str(folder.parent / "onnx"), "-n", "0"])) == 4
    out = capsys.readouterr().out
    assert "first divergence: layer 3 experts" in out and out.strip().endswith("FAIL")


def test_cli_json_and_text_prompt(parity_export, capsys):
    _, folder = parity_export("tiny")
    assert run(parse(["tiny", str(folder), "-n", "2", "--json", "--prompt", "Hello"])) == 0
    data = strict_json(capsys.readouterr().out)
    generation = data["backends"]["ort"]["generation"]
    assert generation["steps"] == 2 and 1 <= len(generation["prompt"]) <= 5  # byte-level BPE of "Hello"


def test_cli_dtype_and_tolerance_overrides(parity_export, capsys):
    """An fp16 export judged by the fp32 row fails; overriding that row with fp16-sized tolerances passes."""
    _, folder = parity_export("tiny", "fp16")
    assert run(parse(["tiny", str(folder), "-n", "0", "--dtype", "fp32"])) == 4
    loose = ["--tol", "logits=0.05,0.02", "--tol", "hidden=0.05,0.02", "--tol", "kv=0.02,0.01",
             "--tol", "router_logits=0.02,0.01", "--tol", "router_weights=0.005,0.005", "--tol", "router_gap=0.005"]
    assert run(parse(["tiny", str(folder), "-n", "0", "--dtype", "fp32", *loose])) == 0
    assert "user override" in json.dumps(
        compare("tiny", folder, steps=0, dtype="fp32", tolerances={"logits": (0.05, 0.02)}).to_dict()["tolerances"])
    capsys.readouterr()


def test_cli_user_errors(parity_export, tmp_path, capsys):
    _, folder = parity_export("tiny")
    with pytest.raises(MoetrtError, match="KIND=ATOL"):
        run(parse(["tiny", str(folder), "--tol", "logits"]))
    no_tokenizer = tmp_path / "copy"
    shutil.copytree(folder, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(MoetrtError, match="token ids"):
        run(parse(["tiny", str(no_tokenizer), "--prompt", "Hello"]))
    assert main(["tiny", str(tmp_path / "missing")]) == 2
    assert "error: artifact" in capsys.readouterr().err
