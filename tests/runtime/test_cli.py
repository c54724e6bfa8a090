"""``moetrt generate``: output, expert statistics, and user errors as one line with the right exit code."""

from __future__ import annotations

import sys

import pytest

from moetrt.cli import build_parser, main
from moetrt.runtime import Session

ERRORS = [  # (argv after "generate", exit code, words the one-line message must contain)
    (["{missing}", "-p", "hi"], 2, "neither an existing folder nor a preset"),
    (["{checkpoint}", "-p", "hi", "--backend", "ort"], 2, "export it first"),
    (["{checkpoint}", "-p", "the cat", "-n", "500"], 2, "max_position_embeddings"),
    (["{checkpoint}", "-p", "the cat", "--top-k", "5"], 2, "set a temperature"),
    (["{checkpoint}", "-p", "the cat", "--device", "cuda:7"], 2, "cuda:7"),
    (["{hf_export}", "-p", "hello", "--backend", "ort"], 2, "takes token ids"),
    (["{hf_export}", "-p", "1 2 500", "--backend", "ort"], 2, "outside the vocabulary"),
    (["{hf_export}", "-p", "1 2", "--backend", "ort", "--expert-stats"], 2, "router outputs"),
    (["{export}", "-p", "hi", "--backend", "trt"], 2, "not a TensorRT engine; build an engine from it first"),
    (["{checkpoint}", "-p", "the cat", "--compile"], 2, "torch back end on CUDA"),
    (["{export}", "-p", "1 2", "--backend", "ort", "--device", "cuda", "--compile"], 2, "--backend torch --device cuda"),
]


@pytest.fixture
def paths(text_checkpoint, text_export, hf_model_export, tmp_path):
    return {
        "checkpoint": str(text_checkpoint), "export": str(text_export), "hf_export": str(hf_model_export),
        "missing": str(tmp_path / "missing"),
    }


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv,code,message", ERRORS)
def test_user_errors_print_one_line_and_exit_with_the_error_code(argv, code, message, paths, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    got, _, err = run(["generate", *(a.format(**paths) for a in argv)], capsys)
    assert got == code
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err


@pytest.mark.parametrize("source,backend,words", [
    ("export", "ort/cpu", "the default for an exported folder"),
    ("checkpoint", "torch/cpu", "the default for a checkpoint or preset"),
])
def test_without_backend_the_source_decides_and_the_cli_says_which_ran(source, backend, words, paths, capsys):
    """An exported folder runs its ONNX (not the PyTorch source it was exported from)."""
    code, out, err = run(["generate", paths[source], "-p", "the cat", "-n", "4"], capsys)
    assert code == 0, err
    assert f"[{backend}]" in err and words in err, err
    code, _, err = run(["generate", paths[source], "-p", "the cat", "-n", "4", "--backend", "torch"], capsys)
    assert code == 0 and "[torch/cpu]" in err and "default" not in err, err


def test_onnxruntime_not_installed_exits_3_naming_the_package(paths, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    code, _, err = run(["generate", paths["export"], "-p", "the cat", "--backend", "ort"], capsys)
    assert code == 3
    assert err == "error: the ort back end needs ONNX Runtime, which is not installed: pip install onnxruntime\n"


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_single_prompt_streams_the_generated_text(backend, paths, capsys):
    source = paths["checkpoint"] if backend == "torch" else paths["export"]
    code, out, err = run(["generate", source, "-p", "once upon a time", "--backend", backend, "-n", "12"], capsys)
    expected = Session(source, backend=backend).generate("once upon a time", max_new_tokens=12).texts[0]
    assert code == 0
    assert out == expected + "\n"
    assert f"[{backend}/cpu] 1 prompt(s), prefill" in err


def test_a_batch_prints_each_prompt_with_its_text(paths, capsys):
    prompts = ["once upon a time", "dog"]
    code, out, _ = run(["generate", paths["export"], "-b", "ort", "-p", prompts[0], "-p", prompts[1],
                        "-n", "8", "-t", "0.8", "--seed", "0"], capsys)
    texts = Session(paths["export"], backend="ort").generate(prompts, max_new_tokens=8, temperature=0.8, seed=0).texts
    assert code == 0
    assert out == f"--- [1] {prompts[0]}\n{texts[0]}\n--- [2] {prompts[1]}\n{texts[1]}\n"


def test_token_ids_in_and_out_without_a_tokenizer(paths, capsys):
    code, out, _ = run(["generate", paths["hf_export"], "-b", "ort", "-p", "5 6 7", "-n", "6", "--ignore-eos"], capsys)
    expected = Session(paths["hf_export"], backend="ort").generate([5, 6, 7], max_new_tokens=6, stop_tokens=()).tokens[0]
    assert code == 0
    assert out.split() == [str(t) for t in expected]


def test_expert_stats_and_heatmap(paths, capsys, tmp_path):
    png = tmp_path / "experts.png"
    code, out, err = run(["generate", paths["export"], "-b", "ort", "-p", "the cat", "-n", "6",
                          "--expert-stats", "--heatmap", str(png)], capsys)
    assert code == 0
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("expert load:"))
    assert lines[header + 1].split()[:2] == ["layer", "max/mean"]
    assert len(lines) - header - 2 == 3  # one row per MoE layer
    assert png.read_bytes()[:4] == b"\x89PNG" and f"wrote expert heat map to {png}" in err


def test_help_lists_generate_and_its_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["generate", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--prompt", "--backend", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed",
                   "--expert-stats", "--heatmap", "examples:"):
        assert option in text


def test_no_command_prints_usage_and_exits_2(capsys):
    assert main([]) == 2
    assert "generate" in capsys.readouterr().err


def _help_examples(command: str) -> list[str]:
    """The `moetrt ...` lines under "examples:" in `moetrt COMMAND --help`."""
    from moetrt.cli import _COMMANDS

    text = _COMMANDS[command].description
    block = text.split("examples:", 1)[1].split("\n\n", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip().startswith("moetrt ")]


def test_help_examples_run_as_written(tmp_path, monkeypatch, capsys):
    """Each example of `moetrt generate --help`, in order, in one folder; they include the runnable
    example of `moetrt export --help` (placeholder paths left out), so each export runs once."""
    import shlex

    monkeypatch.chdir(tmp_path)
    examples = _help_examples("generate")
    assert {e for e in _help_examples("export") if "path/to" not in e} <= set(examples)
    for example in examples:
        code, out, err = run(shlex.split(example)[1:], capsys)
        assert code == 0, f"{example}\n{err}"
        if "--heatmap" in example:
            assert (tmp_path / "experts.png").stat().st_size > 1000
        if "--expert-stats" in example:
            assert "expert load" in out, out


def test_heatmap_into_a_missing_folder_fails_before_generating(paths, capsys):
    code, out, err = run(["generate", paths["checkpoint"], "-p", "the cat", "--heatmap", "/nonexistent-dir/x.png"], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "--heatmap" in err and "does not exist" in err
