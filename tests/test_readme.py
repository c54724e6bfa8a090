"""The README's examples run as written (checkpoint paths swapped for the shipped ``tiny`` preset)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
pytest.importorskip("onnxruntime")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def _usage_commands() -> list[str]:
    """`moetrt ...` lines of the usage block that run on the shipped model (not the placeholder paths)."""
    lines = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("moetrt ") and "path/to" not in line:
                lines.append(line)
    return lines


def test_readme_has_the_two_setup_commands():
    setup = [b.strip() for b in _blocks("bash") if "pip install" in b]
    assert len(setup) == 2
    assert setup[0].endswith("moetrt demo")
    assert setup[1].endswith("pytest -q")
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python -m pytest -q" in ci, "CI must run the README's test command"
    # one install, the same in both: what the README installs is all CI installs (beside pip itself)
    installs = {re.search(r"pip install (.*?) &&", b)[1] for b in setup}
    assert len(installs) == 1, installs
    ci_installs = [line.split("pip install", 1)[1].strip() for line in ci.splitlines()
                   if "pip install" in line and not line.lstrip().startswith("#")]
    assert [i for i in ci_installs if "--upgrade pip" not in i] == list(installs)


def test_dev_extra_holds_what_the_tests_import():
    """The README's one install brings triton (Linux x86_64) and onnxruntime-genai: no test skips for them."""
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml with tomllib")
    dev = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    names = {re.match(r"[A-Za-z0-9_.\-\[\],]+", d)[0].split("[")[0] for d in dev}
    assert {"triton", "onnxruntime-genai", "pytest", "transformers"} <= names, names


def test_readme_cli_examples(tmp_path):
    """The usage lines in order, in one folder (later lines read what earlier ones wrote)."""
    commands = _usage_commands()
    assert any(c.startswith("moetrt parity") for c in commands)
    for command in commands:
        argv = shlex.split(command)
        result = subprocess.run([sys.executable, "-m", "moetrt.cli", *argv[1:]], cwd=tmp_path,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stderr}"
        if argv[1] == "generate":
            assert_reads_as_text(command, result.stdout)


def assert_reads_as_text(command: str, text: str) -> None:
    """No run of one repeated token (the first thing a user runs must not print '****...')."""
    text = text.split("\nexpert load")[0]  # the generated text, not the --expert-stats table
    run = re.search(r"(.{1,6}?)\1{5,}", text, flags=re.S)
    assert run is None, f"{command} printed a run of {run[1]!r}: {text!r}"
    assert re.search(r"[A-Za-z]{3,}", text), f"{command} printed no words: {text!r}"


def test_readme_example_outputs_are_git_ignored():
    """What the usage lines write (-o, --heatmap, --report) stays out of `git status` in a clone."""
    root = README.parent
    if not (root / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout: .gitignore does not apply")
    outputs = set()
    for command in _usage_commands():
        argv = shlex.split(command)
        outputs |= {argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-o", "--output", "--heatmap", "--report")}
    assert {"exported/tiny", "experts.png", "parity-report"} <= outputs, outputs
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *sorted(outputs)], cwd=root,
                             capture_output=True, text=True).stdout.split()
    assert sorted(ignored) == sorted(outputs)


def test_readme_first_command_runs_the_demo(tmp_path):
    """`moetrt demo`: export -> optimize -> generate on every back end -> parity, ending in PASS."""
    result = subprocess.run([sys.executable, "-m", "moetrt.cli", "demo", "-n", "16"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "PASS: every artifact matches the PyTorch model" in result.stdout
    assert "identical on every back end" in result.stdout
    assert list(tmp_path.iterdir()) == [], "the demo leaves nothing behind without --output"
    # each stage's progress counts from 1 (an in-memory model has no load stage to skip)
    counters = [tuple(map(int, m)) for m in re.findall(r"^\[(\d+)/(\d+)\]", result.stderr, flags=re.M)]
    starts = [i for i, _ in counters if i == 1]
    assert counters and counters[0][0] == 1 and len(starts) == 2, counters  # export, then optimize
    assert all(b == a + 1 or b == 1 for (a, _), (b, _) in zip(counters, counters[1:])), counters


def test_readme_python_example(tmp_path):
    code = next(b for b in _blocks("python") if "onnx_from_torch" in b)
    code = code.replace("path/to/checkpoint", "tiny")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("['")


def test_readme_onnxruntime_genai_example(tmp_path):
    """The README's onnxruntime-genai lines run on `moetrt export tiny -o exported/tiny` as written."""
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai (the dev extra) is not installed")
    code = next(b for b in _blocks("python") if "onnxruntime_genai" in b)
    export = subprocess.run([sys.executable, "-m", "moetrt.cli", "export", "tiny", "-o", "exported/tiny", "-q"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert export.returncode == 0, export.stderr
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Return the ")
    assert_reads_as_text("onnxruntime-genai example", result.stdout[len("Return the "):])
