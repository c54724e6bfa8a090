"""Bad input never loses data: a catalogue of what users get wrong, run end to end through the CLI.

Every case must end with ONE line on stderr, ``error: <what is wrong>; <what to do>``, no
traceback, and exit code 2 (3 for a missing back end). A crash (our bug) is told apart: exit
code 1, the traceback, and a line asking for a report. A failed or interrupted write leaves the
previous artifact intact and no temporary folder behind; ``--overwrite`` replaces only moetrt's
own artifacts and never deletes a folder it did not write.

Paths in the tables are templates: ``{export}`` the tiny preset exported once per module (never
modified), ``{external}`` the same with its weights in ``model.onnx.data``, ``{copy}`` /
``{copy_ext}`` fresh copies of those that a case may break, ``{ckpt}`` a fresh copy of a tiny
Hugging Face checkpoint (no tokenizer: prompts are token ids), ``{out}`` a folder that does not
exist yet, ``{userdir}`` a folder of the user's own files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moetrt.cli import main
from moetrt.errors import CheckpointError, MoetrtError

pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")


# --- ways to break a folder -------------------------------------------------------------------
def truncate(name: str, keep: float = 0.5):
    def prepare(paths, folder):
        path = Path(paths[folder]) / name
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])

    return prepare


def delete(name: str):
    def prepare(paths, folder):
        (Path(paths[folder]) / name).unlink()

    return prepare


def garble_header(paths, folder):
    path = Path(paths[folder]) / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # garbage inside the JSON header
    path.write_bytes(bytes(data))


def edit_config(**changes):
    def prepare(paths, folder):
        path = Path(paths[folder]) / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return prepare


def write(name: str, text: str):
    def prepare(paths, folder):
        (Path(paths[folder]) / name).write_text(text)

    return prepare


def nothing(paths, folder):
    pass


def drop_tensor(name: str):
    def prepare(paths, folder):
        from safetensors.torch import load_file, save_file

        path = Path(paths[folder]) / "model.safetensors"
        tensors = load_file(str(path))
        del tensors[name]
        save_file(tensors, str(path))

    return prepare


LONG = " ".join(["5"] * 300)  # the tiny checkpoint has max_position_embeddings 256

# (case, argv, folder the prepare step breaks, prepare, exit code, words the one-line message must hold)
CASES = [
    # checkpoints
    ("safetensors missing", ["generate", "{ckpt}", "-p", "1 2"], "ckpt", delete("model.safetensors"), 2,
     ["no model.safetensors"]),
    ("safetensors corrupt", ["export", "{ckpt}", "-o", "{out}", "-q"], "ckpt", garble_header, 2,
     ["model.safetensors", "corrupt", "re-download"]),
    ("safetensors truncated", ["generate", "{ckpt}", "-p", "1 2"], "ckpt", truncate("model.safetensors"), 2,
     ["model.safetensors", "truncated"]),
    ("config.json missing", ["export", "{ckpt}", "-o", "{out}", "-q"], "ckpt", delete("config.json"), 2,
     ["config.json"]),
    ("config and weights disagree", ["export", "{ckpt}", "-o", "{out}", "-q"], "ckpt",
     edit_config(intermediate_size=40), 2, ["shape", "config.json and the weights disagree"]),
    ("unsupported model_type", ["export", "{ckpt}", "-o", "{out}", "-q"], "ckpt", edit_config(model_type="llama"), 2,
     ["'llama'", "mixtral, qwen2_moe, qwen3_moe, olmoe"]),
    ("unsupported rope type", ["export", "{ckpt}", "-o", "{out}", "-q"], "ckpt",
     edit_config(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0]}), 2,
     ["RoPE type 'longrope'", "linear, dynamic, yarn, llama3"]),
    ("MXFP4 scale tensor missing", ["export", "{ckpt_oss}", "-o", "{out}", "-q"], "ckpt_oss",
     drop_tensor("model.layers.1.mlp.experts.down_proj_scales"), 2,
     ["missing from the checkpoint", "layers.1.mlp.experts.down_proj_scales"]),
    ("layer_types disagree with the layer count", ["generate", "{ckpt_oss}", "-p", "1 2"], "ckpt_oss",
     edit_config(layer_types=["full_attention"]), 2, ["1 layer_types for 3 layers", "one entry per layer"]),
    ("unknown preset (generate)", ["generate", "tinyy", "-p", "hi"], None, nothing, 2,
     ["'tinyy'", "neither an existing folder nor a preset", "tiny"]),
    ("unknown preset (export)", ["export", "tinyy", "-o", "{out}", "-q"], None, nothing, 2, ["'tinyy'", "presets"]),
    # output folders: refuse, never delete
    ("output is an artifact, no --overwrite", ["export", "tiny", "-o", "{copy}", "-q"], None, nothing, 2,
     ["already exists", "--overwrite"]),
    ("output is an artifact, no --overwrite (optimize)", ["optimize", "{export}", "-t", "ort-cpu", "-o", "{copy}", "-q"],
     None, nothing, 2, ["already exists", "pass --overwrite"]),
    ("ort back end on a checkpoint", ["generate", "{ckpt}", "-b", "ort", "-p", "1 2"], None, nothing, 2,
     ["--backend ort runs an exported model folder", "moetrt export", "-o OUT_DIR", "use --backend torch"]),
    ("output holds the user's files, --overwrite", ["export", "tiny", "-o", "{userdir}", "--overwrite", "-q"], None,
     nothing, 2, ["not a moetrt artifact", "choose another folder"]),
    ("output is the user's file, --overwrite", ["export", "tiny", "-o", "{userdir}/notes.txt", "--overwrite", "-q"],
     None, nothing, 2, ["not a moetrt artifact"]),
    ("optimize into its source", ["optimize", "{copy}", "-t", "ort-cpu", "-o", "{copy}", "--overwrite", "-q"], None,
     nothing, 2, ["must differ from the source"]),
    # exported folders given to the runtime, optimize and parity
    ("model.onnx truncated (generate)", ["generate", "{copy}", "-b", "ort", "-p", "hi"], "copy",
     truncate("model.onnx"), 2, ["model.onnx", "does not match the checksum", "re-export"]),
    ("model.onnx truncated (generate, default back end)", ["generate", "{copy}", "-p", "hi"], "copy",
     truncate("model.onnx"), 2, ["model.onnx", "does not match the checksum", "re-export"]),
    ("model.onnx truncated (optimize)", ["optimize", "{copy}", "-t", "ort-cpu", "-o", "{out}", "-q"], "copy",
     truncate("model.onnx"), 2, ["model.onnx", "does not match the checksum", "re-export"]),
    ("model.onnx truncated (parity)", ["parity", "tiny", "{copy}", "-n", "0", "--no-localize"], "copy",
     truncate("model.onnx"), 2, ["model.onnx", "does not match the checksum"]),
    ("model.onnx missing (generate)", ["generate", "{copy}", "-b", "ort", "-p", "hi"], "copy", delete("model.onnx"), 2,
     ["missing model.onnx", "re-export"]),
    ("model.onnx missing (optimize)", ["optimize", "{copy}", "-t", "ort-cpu", "-o", "{out}", "-q"], "copy",
     delete("model.onnx"), 2, ["missing model.onnx"]),
    ("model.onnx.data missing (generate)", ["generate", "{copy_ext}", "-b", "ort", "-p", "1 2"], "copy_ext",
     delete("model.onnx.data"), 2, ["missing model.onnx.data", "copy the whole folder"]),
    ("model.onnx.data missing (optimize)", ["optimize", "{copy_ext}", "-t", "ort-cpu", "-o", "{out}", "-q"],
     "copy_ext", delete("model.onnx.data"), 2, ["missing model.onnx.data"]),
    ("model.onnx.data truncated (generate)", ["generate", "{copy_ext}", "-b", "ort", "-p", "1 2"], "copy_ext",
     truncate("model.onnx.data"), 2, ["model.onnx.data", "does not match the checksum"]),
    ("model.onnx.data truncated (optimize)", ["optimize", "{copy_ext}", "-t", "ort-cpu", "-o", "{out}", "-q"],
     "copy_ext", truncate("model.onnx.data"), 2, ["model.onnx.data", "does not match the checksum"]),
    ("moetrt.json corrupt", ["generate", "{copy}", "-b", "ort", "-p", "hi"], "copy", write("moetrt.json", "{oops"), 2,
     ["moetrt.json", "corrupt", "re-export"]),
    ("moetrt.json missing", ["optimize", "{copy}", "-t", "ort-cpu", "-o", "{out}", "-q"], "copy",
     delete("moetrt.json"), 2, ["no moetrt.json"]),
    # prompts and options
    ("token id above the vocabulary", ["generate", "{ckpt}", "-p", "1 2 500"], None, nothing, 2,
     ["token id 500", "outside the vocabulary 0..95"]),
    ("negative token id", ["generate", "{ckpt}", "-p", "-1 2"], None, nothing, 2, ["token id -1", "outside"]),
    ("text for a model without tokenizer", ["generate", "{ckpt}", "-p", "hello"], None, nothing, 2,
     ["no tokenizer.json", "token ids"]),
    ("prompt longer than max positions", ["generate", "{ckpt}", "-p", LONG, "-n", "1"], None, nothing, 2,
     ["300 tokens", "max_position_embeddings (256)", "shorten the prompt"]),
    ("prompt + new tokens past max positions", ["generate", "{export}", "-b", "ort", "-p", "hi", "-n", "600"], None,
     nothing, 2, ["max_position_embeddings (512)", "lower --max-new-tokens (-n)"]),
    ("max_new_tokens 0", ["generate", "{export}", "-b", "ort", "-p", "hi", "-n", "0"], None, nothing, 2,
     ["--max-new-tokens (-n) must be a positive integer"]),
    ("top_p out of range", ["generate", "{export}", "-b", "ort", "-p", "hi", "-t", "1", "--top-p", "3"], None,
     nothing, 2, ["top_p must be in (0, 1]"]),
    ("dtype of an export", ["generate", "{export}", "-b", "ort", "-p", "hi", "--dtype", "fp16"], None, nothing, 2,
     ["fixed by the export"]),
]


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    """Temporary folders of an atomic write (``.NAME.partial-*``, ``.NAME.old-*``)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny preset exported once (with its tokenizer)."""
    from moetrt.export import onnx_from_torch

    return onnx_from_torch("tiny", tmp_path_factory.mktemp("bad-input") / "tiny", progress=False)


@pytest.fixture(scope="module")
def external(exported, tmp_path_factory):
    """The tiny export with its weights in model.onnx.data, as ``--external-data yes`` lays it out
    (re-saved with its checksums rewritten rather than traced again, to keep this file fast)."""
    import onnx

    from moetrt.artifact import METADATA_FILE, sha256_file

    out = shutil.copytree(exported, tmp_path_factory.mktemp("bad-input") / "external")
    onnx.save_model(onnx.load(out / "model.onnx"), out / "model.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    meta = json.loads((out / METADATA_FILE).read_text())
    meta["export"]["external_data"] = True
    meta["files"] = {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.name != METADATA_FILE}
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2))
    return out


def test_the_external_data_folder_runs(external):
    from moetrt.runtime import Session

    assert (external / "model.onnx.data").stat().st_size > (external / "model.onnx").stat().st_size
    assert len(Session(external, backend="ort").generate([1, 2], max_new_tokens=2).tokens[0]) == 2


@pytest.fixture(scope="module")
def mxfp4_checkpoint(tmp_path_factory):
    """A tiny gpt-oss checkpoint with its experts in MXFP4, as the released ones store them."""
    from tests.hf_tiny import hf_tiny_model, save_mxfp4_checkpoint

    folder = tmp_path_factory.mktemp("bad-input") / "gpt_oss"
    save_mxfp4_checkpoint(hf_tiny_model("gpt_oss"), folder)
    return folder


@pytest.fixture
def paths(exported, external, tiny_checkpoint, mxfp4_checkpoint, tmp_path):
    _, checkpoint = tiny_checkpoint("mixtral")
    work = tmp_path / "work"
    work.mkdir()
    userdir = work / "mine"
    userdir.mkdir()
    (userdir / "notes.txt").write_text("the user's own file\n")
    paths = {
        "export": exported, "external": external, "userdir": userdir, "out": work / "out",
        "copy": shutil.copytree(exported, work / "copy"), "copy_ext": shutil.copytree(external, work / "copy_ext"),
        "ckpt": shutil.copytree(checkpoint, work / "ckpt"),
        "ckpt_oss": shutil.copytree(mxfp4_checkpoint, work / "ckpt_oss"),
    }
    return {name: str(path) for name, path in paths.items()}


def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, needles) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1, f"not one error line:\n{err}"
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"


@pytest.mark.parametrize("case,argv,folder,prepare,code,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_exit_code(case, argv, folder, prepare, code, needles, paths, capsys):
    prepare(paths, folder)
    before = {name: _tree_digest(Path(paths[name])) for name in ("export", "userdir")}
    got, _, err = run_cli([a.format(**paths) for a in argv], capsys)
    assert got == code, err
    assert_one_line_error(err, needles)
    # the command line names its flags, never the Python API's keyword arguments
    assert not re.search(r"\b(overwrite|check_runtime|device|backend|dtype|max_new_tokens)\b ?=", err), err
    # nothing of the user's (nor the shared export) changed, and no temporary folder is left
    assert {name: _tree_digest(Path(paths[name])) for name in ("export", "userdir")} == before
    assert not Path(paths["out"]).exists()
    assert _leftovers(Path(paths["out"]).parent) == []


# --- the Python API raises the same errors -----------------------------------------------------
API_CASES = [  # (case, folder to break, prepare, call(paths), exception, words)
    ("Session on a truncated model.onnx", "copy", truncate("model.onnx"),
     lambda p: _session(p["copy"]), CheckpointError, ["does not match the checksum"]),
    ("Session on a folder missing model.onnx.data", "copy_ext", delete("model.onnx.data"),
     lambda p: _session(p["copy_ext"]), CheckpointError, ["missing model.onnx.data"]),
    ("token id out of range", None, nothing,
     lambda p: _session(p["export"]).generate([[1, 2, 10**6]], max_new_tokens=1), MoetrtError,
     ["token id 1000000", "outside the vocabulary"]),
    ("prompt longer than max positions", None, nothing,
     lambda p: _session(p["export"]).generate([[5] * 600], max_new_tokens=1), MoetrtError,
     ["600 tokens", "max_position_embeddings"]),
    ("export into the user's folder", None, nothing,
     lambda p: _export("tiny", p["userdir"], overwrite=True), MoetrtError, ["not a moetrt artifact"]),
    ("unknown preset", None, nothing, lambda p: _session("tinyy", backend="torch"), CheckpointError, ["presets"]),
    ("export over an artifact", None, nothing, lambda p: _export("tiny", p["copy"]), MoetrtError,
     ["already exists", "pass overwrite=True"]),
    ("ort back end on a checkpoint", None, nothing, lambda p: _session(p["ckpt"]), MoetrtError,
     ["backend='ort' runs an exported model folder", "onnx_from_torch", "or use backend='torch'"]),
]


def _session(source, backend="ort"):
    from moetrt.runtime import Session

    return Session(source, backend=backend)


def _export(source, out, **options):
    from moetrt.export import onnx_from_torch

    return onnx_from_torch(source, out, progress=False, **options)


@pytest.mark.parametrize("case,folder,prepare,call,exc_type,needles", API_CASES, ids=[c[0] for c in API_CASES])
def test_python_api_raises_a_moetrt_error(case, folder, prepare, call, exc_type, needles, paths):
    prepare(paths, folder)
    with pytest.raises(exc_type) as info:
        call(paths)
    for needle in needles:
        assert needle in str(info.value)
    assert not re.search(r"(?<![\w-])--[a-z]", str(info.value)), "the API names its arguments, not CLI flags"


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "--overwrite"])
def test_an_empty_output_folder_is_written_into(overwrite, paths, capsys):
    """A folder the user made for the output holds nothing to lose: accepted with or without --overwrite."""
    out = Path(paths["out"])
    out.mkdir()
    code, _, err = run_cli(["optimize", paths["export"], "-t", "ort-cpu", "-o", str(out), "-q", *overwrite], capsys)
    assert code == 0, err
    assert (out / "moetrt.json").is_file() and _leftovers(out.parent) == []


# --- NaN weights: a warning naming the tensor, not an error ------------------------------------
def test_nan_weights_warn_on_one_line_naming_the_tensor(paths, capsys):
    from safetensors.torch import load_file, save_file

    path = Path(paths["ckpt"]) / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.embed_tokens.weight"][95] = float("nan")  # the row of a token the prompt does not use
    save_file(tensors, str(path), metadata={"format": "pt"})
    code, out, err = run_cli(["generate", paths["ckpt"], "-p", "1 2 3", "-n", "1"], capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "embed_tokens.weight" in warnings[0] and "NaN" in warnings[0], err
    assert "Traceback" not in err and "warnings.warn" not in err
    assert len(out.split()) == 1


# --- a failed or interrupted write keeps the previous artifact ----------------------------------
def _interrupt_save(monkeypatch, exc: BaseException):
    """Make the next ``onnx_ir.save`` write half of model.onnx, then raise ``exc``."""
    import onnx_ir

    real_save = onnx_ir.save

    def save(model, path, *args, **kwargs):
        real_save(model, path, *args, **kwargs)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise exc

    monkeypatch.setattr(onnx_ir, "save", save)


@pytest.mark.parametrize("stage,argv,exc,code,message", [
    ("export", ["export", "{ckpt}", "-o", "{copy}", "--overwrite", "-q"],
     OSError(errno.ENOSPC, "No space left on device", "model.onnx"), 2,
     "error: No space left on device (model.onnx); free some disk space or write to another folder, then run again\n"),
    ("optimize", ["optimize", "{export}", "-t", "ort-cpu", "-o", "{copy}", "--overwrite", "-q"],
     KeyboardInterrupt(), 130, "interrupted\n"),
], ids=["export-disk-full", "optimize-interrupted"])
def test_failed_write_keeps_the_previous_artifact(stage, argv, exc, code, message, paths, capsys, monkeypatch):
    previous = _tree_digest(Path(paths["copy"]))
    _interrupt_save(monkeypatch, exc)
    got, _, err = run_cli([a.format(**paths) for a in argv], capsys)
    assert (got, err) == (code, message)
    assert _tree_digest(Path(paths["copy"])) == previous
    assert _leftovers(Path(paths["copy"]).parent) == []


def test_overwrite_keeps_files_the_user_added_to_an_artifact(paths, capsys):
    notes = Path(paths["copy"]) / "my-notes.txt"
    notes.write_text("mine\n")
    code, _, err = run_cli(["optimize", paths["export"], "-t", "ort-cpu", "-o", paths["copy"], "--overwrite", "-q"],
                           capsys)
    assert notes.exists(), f"--overwrite deleted {notes.name} (exit {code}: {err})"
    assert code == 2 and "holds files moetrt did not write (my-notes.txt)" in err, err


# --- exit codes: usage errors 2, crashes 1 with the traceback -----------------------------------
def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "tiny"])  # no --prompt
    assert info.value.code == 2
    assert "--prompt" in capsys.readouterr().err


def test_a_crash_exits_1_with_the_traceback_and_a_report_line(paths, capsys, monkeypatch):
    import moetrt.export

    def broken(*args, **kwargs):
        raise RuntimeError("an internal invariant broke")

    monkeypatch.setattr(moetrt.export, "onnx_from_torch", broken)
    code, _, err = run_cli(["export", "tiny", "-o", paths["out"], "-q"], capsys)
    assert code == 1
    assert "Traceback" in err and "RuntimeError: an internal invariant broke" in err
    assert err.rstrip().splitlines()[-1].endswith("please report it with the command line and the traceback above")


def test_exit_codes_of_the_installed_command(paths):
    """The real process: one error line and exit 2; argparse's usage errors also exit 2."""
    cmd = [sys.executable, "-m", "moetrt.cli"]
    bad = subprocess.run([*cmd, "generate", paths["out"], "-p", "hi"], capture_output=True, text=True, timeout=120,
                         check=False)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1, bad.stderr
    usage = subprocess.run([*cmd, "export", "tiny"], capture_output=True, text=True, timeout=120, check=False)
    assert usage.returncode == 2 and "--output" in usage.stderr


# --- preset names and paths ---------------------------------------------------------------------
def test_a_preset_name_is_the_preset_even_beside_a_folder_of_that_name(tmp_path, monkeypatch):
    """`tiny` names the preset; `./tiny` names the folder; the warning says which was used and how to get the other."""
    import moetrt

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "notes.txt").write_text("not a model\n")
    with pytest.warns(UserWarning, match=r"preset tiny, not the folder tiny here; write ./tiny for the folder"):
        model = moetrt.from_pretrained("tiny")
    assert model.source == "tiny" and model.config.vocab_size == 512
    with pytest.raises(CheckpointError, match="tiny has no config.json"):
        moetrt.from_pretrained("./tiny")


def test_a_full_size_preset_is_refused_with_the_memory_it_needs(monkeypatch, capsys):
    """Not allocated and then killed: refused up front, and left out of the hint of presets."""
    import moetrt
    from moetrt import checkpoint

    monkeypatch.setattr(checkpoint, "_available_memory", lambda: 8 * 2**30)
    with pytest.raises(MoetrtError, match=r"preset 'mixtral-8x7b' is a randomly initialised model of 18\d\.\d GB"):
        moetrt.from_pretrained("mixtral-8x7b")
    code, _, err = run_cli(["generate", "mixtral-8x7b", "-p", "hi"], capsys)
    assert code == 2
    assert_one_line_error(err, ["mixtral-8x7b", "GB of memory available here", "'tiny' runs anywhere"])
    code, _, err = run_cli(["generate", "tinyy", "-p", "hi"], capsys)
    assert code == 2 and "tiny" in err and "mixtral-8x7b" not in err and "bench-small" in err
