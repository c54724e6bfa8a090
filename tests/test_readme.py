"""The README's examples run as written (checkpoint paths swapped for the shipped ``tiny`` preset)."""

from __future__ import annotations

import re
import shlex
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


@pytest.mark.parametrize("command", _usage_commands())
def test_readme_cli_examples(tmp_path, command, _exported_tiny):
    argv = shlex.split(command)
    if argv[1] == "export":
        # the export itself is covered by the fixture; run it into a fresh folder
        argv[argv.index("-o") + 1] = str(tmp_path / "again")
    argv = [str(_exported_tiny) if a == "exported/tiny" else a for a in argv]
    result = subprocess.run([sys.executable, "-m", "moetrt.cli", *argv[1:]], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_readme_python_example(tmp_path):
    (code,) = _blocks("python")
    code = code.replace("path/to/checkpoint", "tiny")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("['")


@pytest.fixture(scope="module")
def _exported_tiny(tmp_path_factory):
    from moetrt.export import onnx_from_torch

    return onnx_from_torch("tiny", tmp_path_factory.mktemp("readme") / "tiny", progress=False)
