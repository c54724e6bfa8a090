"""``moetrt parity SRC ARTIFACT``: the command line face of :func:`moetrt.parity.compare`.

``add_arguments(parser)`` declares the options and ``run(args)`` calls ``compare``, prints the
summary and returns the exit code: 0 when every check passed, 4 when one failed (user errors
raise :class:`moetrt.MoetrtError`, which the ``moetrt`` entry point prints and turns into 2, or 3
for a missing back end).
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

from moetrt.errors import MoetrtError

from .compare import BACKENDS, compare
from .tolerances import ALL, DTYPES, KINDS, parse_tolerances

__all__ = ["HELP", "add_arguments", "run", "main"]

HELP = "check that an exported artifact computes what the fp32 PyTorch model computes"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SRC",
                   help="the PyTorch model the artifact was made from: a preset name (e.g. tiny) or a checkpoint folder")
    p.add_argument("artifact", metavar="ARTIFACT",
                   help="an exported folder (moetrt export / optimize), a .onnx file or a TensorRT engine")
    p.add_argument("--backend", "-b", action="append", choices=BACKENDS, default=None,
                   help="run the artifact on ort (ONNX Runtime CPU) or trt (TensorRT); repeat for both (default: ort)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="the artifact's precision, which selects the tolerances (default: from moetrt.json or the graph)")
    p.add_argument("--tol", action="append", default=[], metavar="KIND=ATOL[,RTOL]",
                   help=f"override a tolerance, e.g. --tol logits=1e-3,1e-4; kinds: {ALL}, {', '.join(KINDS)} "
                        f"({ALL}: every compared value, the bound to accept a quantized artifact under)")
    p.add_argument("--report", metavar="DIR", default=None,
                   help="write report.json, report.md and parity.png into DIR")
    p.add_argument("--json", action="store_true", help="print the JSON report to stdout instead of the summary")
    g = p.add_argument_group("inputs")
    g.add_argument("--batch", type=int, default=2,
                   help="rows of the compared batch; row 1 is left-padded (default: %(default)s)")
    g.add_argument("--seq", type=int, default=16, help="prefill tokens (default: %(default)s)")
    g.add_argument("--new-tokens", type=int, default=4,
                   help="tokens fed after the prefill, on its KV cache (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random token ids (default: %(default)s)")
    g.add_argument("--steps", "-n", type=int, default=16,
                   help="greedy generation steps; 0 skips generation (default: %(default)s)")
    g.add_argument("--prompt", "-p", default=None,
                   help="generation prompt: text (with the artifact's tokenizer.json) or token ids '1 5 9' "
                        "(default: the first row of the compared batch)")
    p.add_argument("--no-localize", action="store_true",
                   help="compare the graph outputs only (no per-layer outputs marked on a copy of the model)")
    p.add_argument("--verbose", "-v", action="store_true", help="show Polygraphy's log")


def _prompt(text: str | None, artifact: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        pass
    from moetrt.runtime.text import Tokenizer

    folder = Path(artifact) if Path(artifact).is_dir() else Path(artifact).parent
    tokenizer = Tokenizer.from_folder(folder)
    if tokenizer is None:
        raise MoetrtError(f"{artifact} has no tokenizer.json, so --prompt takes token ids (e.g. --prompt '1 5 9'), "
                          f"got {text!r}")
    ids = tokenizer.encode(text)
    if not ids:
        raise MoetrtError(f"--prompt {text!r} encodes to no tokens; give a longer prompt")
    return ids


def run(args: argparse.Namespace) -> int:
    """Compare an artifact with the fp32 PyTorch model it was made from, layer by layer.

    Checks logits, KV cache and every layer's hidden states under the tolerance table, router
    decisions per MoE layer (near-ties reported, other disagreements failed), and greedy
    generation. On a failure it names the first layer and op kind (attention, router, experts,
    norm) that leaves tolerance. Exit code 0: pass, 4: fail.

    examples:
      moetrt parity tiny exported/tiny
      moetrt parity tiny exported/tiny-fp16 --report parity-report
      moetrt parity ./my-checkpoint exported/model --backend trt --tol logits=0.1,0.05
      moetrt parity tiny optimized/tiny-int4 --tol all=10,0.5
    """
    try:
        overrides = parse_tolerances(args.tol)
    except ValueError as exc:
        raise MoetrtError(str(exc)) from exc
    from moetrt.runtime.model_folder import METADATA_FILE, check_artifact_files, explain_broken_artifact

    artifact = Path(args.artifact)
    if (artifact / METADATA_FILE).is_file():
        check_artifact_files(artifact, checksums=False, model_only=True)  # fail before the reference runs
    try:
        report = compare(
            args.source, args.artifact, backends=tuple(args.backend or ("ort",)), dtype=args.dtype,
            tolerances=overrides or None, batch=args.batch, seq=args.seq, new_tokens=args.new_tokens, seed=args.seed,
            steps=args.steps, prompt=_prompt(args.prompt, args.artifact), localize=not args.no_localize,
            report_dir=args.report, verbose=args.verbose,
        )
    except MoetrtError:
        raise
    except Exception as exc:  # a corrupt or truncated model.onnx(.data) fails deep inside the ONNX reader
        explain_broken_artifact(artifact, exc)
        raise
    if args.json:
        print(report.to_json())
    else:
        print(report.summary())
        if args.report:
            print(f"wrote {Path(args.report) / 'report.json'}, report.md and parity.png", file=sys.stderr)
        quantized = _quantized(artifact)
        if report.passed or not quantized:
            print("PASS" if report.passed else "FAIL")
        else:
            print(f"the artifact is quantized ({quantized}): it computes something else on purpose; to accept it, "
                  f"state the bound: --tol {ALL}=ATOL,RTOL (with -n 0 where its greedy tokens may differ)")
            print("FAIL")
    return report.exit_code


def _quantized(artifact: Path) -> str:
    """What of an optimized folder is quantized ("int4 experts, int8 weights"), "" for none."""
    from moetrt.artifact import read_metadata

    try:
        options = read_metadata(artifact).get("optimize") or {}
    except MoetrtError:
        return ""
    parts = [f"{options[key]} {what}" for key, what in (("quantize_experts", "experts"), ("quantize_weights", "weights"))
             if options.get(key)]
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """``python -m moetrt.parity.cli SRC ARTIFACT ...`` (the same as ``moetrt parity``)."""
    parser = argparse.ArgumentParser(prog="moetrt parity", description=inspect.cleandoc(run.__doc__ or HELP),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except MoetrtError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
