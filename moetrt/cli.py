"""The ``moetrt`` command line. Each subcommand parses, calls the library function a Python user
would call, and prints; it is registered with :func:`command` as one function plus the function
that declares its arguments.

Exit codes:

- 0: done (``parity``: every check passed);
- 1: moetrt crashed: a crash prints its traceback and a line saying it is a bug to report;
- 2: the input or the environment needs fixing: a usage error (argparse), a
  :class:`moetrt.MoetrtError` (bad path, corrupt file, unsupported model, ...) or an ``OSError``
  (disk full, permission denied); one line ``error: <what is wrong>; <what to do>`` on stderr,
  no traceback;
- 3: an optional back end is not installed (:class:`moetrt.BackendMissingError`);
- 4: a check ran and failed: ``parity`` (or ``demo``) found a mismatch (``moetrt.errors.CHECK_FAILED``);
- 130: interrupted (Ctrl-C).

Warnings (e.g. NaN weights in a checkpoint) print as one line ``warning: <message>``.
"""

from __future__ import annotations

import argparse
import errno
import inspect
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moetrt.dtypes import DTYPES
from moetrt.errors import CHECK_FAILED, MoetrtError

__all__ = ["main", "build_parser", "command"]


@dataclass(frozen=True)
class _Command:
    name: str
    help: str
    description: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


_COMMANDS: dict[str, _Command] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]):
    """Register ``run(args) -> exit code`` as ``moetrt <name>``; its docstring is the long description."""

    def register(run: Callable[[argparse.Namespace], int | None]):
        _COMMANDS[name] = _Command(name, help, inspect.cleandoc(run.__doc__ or help), arguments, run)
        return run

    return register


# --- moetrt generate ---------------------------------------------------------------------------
def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source", metavar="SRC",
        help="an exported folder (moetrt export), a Hugging Face checkpoint folder, or a preset name (e.g. tiny)",
    )
    p.add_argument(
        "--prompt", "-p", action="append", required=True, metavar="TEXT",
        help="prompt text; repeat for a batch. For a model without tokenizer.json, token ids: '1 5 9'",
    )
    p.add_argument("--backend", "-b", default=None, choices=("torch", "ort", "trt"),
                   help="torch: the PyTorch model; ort: ONNX Runtime on an exported folder; trt: a TensorRT "
                        "engine folder (default: what SRC is: ort for an exported folder, trt for an engine "
                        "folder, torch for a checkpoint or preset)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu; trt: cuda)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="precision of the torch back end (default: the checkpoint's, fp32); exports fix their own")
    p.add_argument("--compile", action="store_true",
                   help="torch back end on CUDA: torch.compile the decode step it replays as a CUDA graph "
                        "(faster decode; a few seconds of compiling at the first step)")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", "-n", type=int, default=32, metavar="N", help="default: %(default)s")
    g.add_argument("--temperature", "-t", type=float, default=0.0,
                   help="0 is greedy (default); > 0 samples, e.g. 0.8")
    g.add_argument("--top-k", type=int, default=None, metavar="K", help="sample from the K most likely tokens")
    g.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling: smallest set reaching P")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling (same seed, same tokens)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's eos token")
    s = p.add_argument_group("expert statistics")
    s.add_argument("--expert-stats", action="store_true",
                   help="print tokens per expert and load imbalance (max/mean) per MoE layer")
    s.add_argument("--heatmap", metavar="PNG", default=None,
                   help="save a layers x experts heat map of the expert load (needs matplotlib)")


@command("generate", "generate text (or token ids) from a model", _generate_arguments)
def _generate(args: argparse.Namespace) -> int:
    """Generate from a model: greedy by default, sampling with --temperature.

    One prompt streams its text to stdout as it is generated; several prompts run as one
    batch and print one after another. Timing goes to stderr.

    examples:
      moetrt generate tiny --prompt "Return the "
      moetrt export tiny -o exported/tiny
      moetrt generate exported/tiny -p "The default value is " -p "Create a new " -n 64 -t 0.8 --seed 0
      moetrt generate tiny -p "Create a new " --expert-stats --heatmap experts.png
      moetrt export tiny -o exported/tiny-router --router-outputs
      moetrt generate exported/tiny-router -p "Create a new " --expert-stats

    --expert-stats counts the routings the model reports: the torch back end always does, an
    exported folder when it was exported with --router-outputs.
    """
    from moetrt.runtime import Session

    if args.compile and (args.backend not in (None, "torch") or not (args.device or "cpu").startswith("cuda")):
        raise MoetrtError("--compile applies to the torch back end on CUDA: add --backend torch --device cuda")
    if args.heatmap is not None:  # checked before the model loads and generates, not after
        folder = Path(args.heatmap).parent
        if not folder.is_dir():
            raise MoetrtError(f"--heatmap {args.heatmap}: the folder {folder} does not exist; create it or "
                              "choose another path")
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            from moetrt.errors import BackendMissingError

            raise BackendMissingError("--heatmap needs matplotlib, which is not installed: pip install matplotlib")
    backend = args.backend or _default_backend(args.source)
    if args.compile and backend != "torch":
        raise MoetrtError("--compile applies to the torch back end on CUDA: add --backend torch --device cuda")
    backend_options = {"compile_decode": True} if args.compile else {}
    session = Session(args.source, backend=backend, device=args.device, dtype=args.dtype, **backend_options)
    prompts = [_parse_prompt(session, text) for text in args.prompt]
    stats = args.expert_stats or args.heatmap is not None
    options = dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, stop_tokens=() if args.ignore_eos else None, expert_stats=stats,
    )
    text = isinstance(prompts[0], str)
    out = sys.stdout
    if len(prompts) == 1:
        stream = session.stream(prompts[0], **options)
        for piece in stream:
            out.write(piece.text if text else f"{piece.token} ")
            out.flush()
        out.write("\n")
        result = stream.result
    else:
        result = session.generate(prompts, **options)
        for i, (prompt, tokens) in enumerate(zip(prompts, result.tokens)):
            shown = prompt if text else " ".join(map(str, prompt))
            generated = result.texts[i] if text else " ".join(map(str, tokens))
            out.write(f"--- [{i + 1}] {shown}\n{generated}\n")
    assert result is not None
    out.flush()  # the text before the timing line on a shared terminal
    steps = result.decode_steps
    rate = f", decode {steps} steps at {result.decode_tokens_per_second:.1f} steps/s" if steps else ""
    chosen = "" if args.backend else f" (the default for {_SOURCE_WORDS[backend]}; --backend chooses another)"
    print(
        f"[{session.backend.name}/{session.backend.device}] {len(prompts)} prompt(s), "
        f"prefill {result.prefill_seconds * 1e3:.1f} ms{rate}{chosen}",
        file=sys.stderr,
    )
    if result.stats is not None:
        if args.expert_stats:
            out.write("\n" + result.stats.table() + "\n")
        if args.heatmap:
            path = result.stats.heatmap(args.heatmap)
            print(f"wrote expert heat map to {path}", file=sys.stderr)
    return 0


_SOURCE_WORDS = {"ort": "an exported folder", "trt": "an engine folder", "torch": "a checkpoint or preset"}


def _default_backend(source: str) -> str:
    """The back end a source runs on when --backend is not given: what the folder holds."""
    from moetrt.runtime.model_folder import default_backend

    return default_backend(source)


def _parse_prompt(session, text: str) -> str | list[int]:
    """Text for a model with a tokenizer; token ids ('1 5 9' or '1,5,9') for one without."""
    if session.tokenizer is not None:
        return text
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise MoetrtError(
            f"this model has no tokenizer.json, so --prompt takes token ids (e.g. --prompt '1 5 9'), got {text!r}"
        ) from None


# --- moetrt export -----------------------------------------------------------------------------
def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SRC", help="a Hugging Face checkpoint folder or a preset name (e.g. tiny)")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="the folder to write (must not exist)")
    p.add_argument("--dtype", default="fp32", choices=DTYPES,
                   help="weights and activations; router math and logits stay fp32 (default: %(default)s)")
    p.add_argument("--router-outputs", action="store_true",
                   help="add router_weights.{i} / router_indices.{i} outputs per MoE layer (parity, expert stats)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 20)")
    p.add_argument("--external-data", choices=("auto", "yes", "no"), default="auto",
                   help="weights in model.onnx.data (auto: when over 1 GiB; needed past 2 GB)")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it is an earlier moetrt artifact")
    p.add_argument("--no-check", action="store_true", help="skip onnx.checker's full check of the result")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress display")


@command("export", "export a model to the canonical ONNX folder", _export_arguments)
def _export(args: argparse.Namespace) -> int:
    """Export to ONNX with one moetrt::TopKRouting and one moetrt::SparseMoE node per MoE layer.

    The folder holds model.onnx (+ model.onnx.data for large models), moetrt.json (config,
    export options, I/O spec, versions, checksums) and the tokenizer files of the source. One
    graph serves prefill and decode (dynamic batch, sequence and past length). The write is
    atomic: a failed export leaves nothing behind.

    examples:
      moetrt export tiny -o exported/tiny
      moetrt export path/to/Mixtral-checkpoint -o exported/mixtral --dtype fp16
    """
    from moetrt.export import onnx_from_torch
    from moetrt.export.onnx_from_torch import DEFAULT_OPSET

    external = {"auto": None, "yes": True, "no": False}[args.external_data]
    out = onnx_from_torch(
        args.source, args.output, dtype=args.dtype, router_outputs=args.router_outputs,
        opset=args.opset or DEFAULT_OPSET, external_data=external, overwrite=args.overwrite,
        check=not args.no_check, progress=not args.quiet,
    )
    print(out)
    return 0


# --- moetrt demo -------------------------------------------------------------------------------
def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="preset or checkpoint folder (default: %(default)s)")
    p.add_argument("--output", "-o", default=None, metavar="DIR",
                   help="keep the artifacts in DIR (default: a temporary folder, removed at the end)")
    p.add_argument("--prompt", "-p", default="The default value is ", help="default: %(default)r")
    p.add_argument("--max-new-tokens", "-n", type=int, default=48, metavar="N", help="default: %(default)s")


@command("demo", "run the whole pipeline on the built-in tiny model", _demo_arguments)
def _demo(args: argparse.Namespace) -> int:
    """The main job end to end: export -> optimize (when available) -> generate on each back end
    -> parity against the fp32 PyTorch model, with a short summary.

    examples:
      moetrt demo
      moetrt demo --output demo-artifacts -p "Create a new " -n 64
    """
    import importlib.util
    import tempfile
    from pathlib import Path

    import moetrt
    from moetrt.export import onnx_from_torch

    work = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="moetrt-demo-"))
    summary: list[tuple[str, str]] = []
    try:
        print(f"== 1. load {args.model}", file=sys.stderr)
        model = moetrt.from_pretrained(args.model)
        cfg = model.config
        params = sum(p.numel() for p in model.parameters())
        summary.append(("model", f"{args.model}: {params / 1e6:.2f} M parameters, {cfg.num_hidden_layers} layers, "
                                 f"{cfg.num_experts} experts top-{cfg.num_experts_per_tok}"))

        print("== 2. export to ONNX", file=sys.stderr)
        exported = onnx_from_torch(model, work / "onnx", router_outputs=True, overwrite=True)
        summary.append(("export", f"{exported} ({(exported / 'model.onnx').stat().st_size / 1e6:.1f} MB)"))

        folders = {"ort": exported}
        if importlib.util.find_spec("moetrt.optimize.lower") is not None:
            from moetrt.optimize import optimize

            print("== 3. optimize for ONNX Runtime (CPU)", file=sys.stderr)
            folders["ort-optimized"] = optimize(exported, work / "ort-cpu", target="ort-cpu", overwrite=True)
            summary.append(("optimize", str(folders["ort-optimized"])))
        else:
            summary.append(("optimize", "skipped: the optimize stage is not in this version"))

        print(f"== 4. generate {args.max_new_tokens} tokens greedily on each back end", file=sys.stderr)
        from moetrt.runtime import Session

        runs = {"torch": Session(model, backend="torch")}
        runs.update({name: Session(folder, backend="ort") for name, folder in folders.items()})
        tokens = {}
        for name, session in runs.items():
            session.generate([args.prompt], max_new_tokens=2)  # warm-up: one-off library initialisation
            result = session.generate([args.prompt], max_new_tokens=args.max_new_tokens, expert_stats=True)
            tokens[name] = result.tokens[0]
            rate = result.decode_tokens_per_second
            summary.append((f"generate [{name}]", f"{rate:.0f} tokens/s decode, prefill {result.prefill_seconds * 1e3:.1f} ms"))
            if name == "torch":
                print(f"\n{args.prompt}{result.texts[0]}\n", flush=True)
                print(result.stats.table(), flush=True)
        same = all(t == tokens["torch"] for t in tokens.values())
        summary.append(("greedy tokens", "identical on every back end" if same else f"DIFFER: {tokens}"))

        print("== 5. parity against the fp32 PyTorch model", file=sys.stderr)
        from moetrt.parity import compare

        ok = same
        for name, folder in folders.items():
            report = compare(model, folder, backends=["ort"], steps=16,
                             report_dir=work / f"parity-{name}" if args.output else None)
            ok = ok and report.passed
            summary.append((f"parity [{name}]", report.summary()))
    finally:
        if args.output is None:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    width = max(len(k) for k, _ in summary)
    print("\nsummary")
    for key, value in summary:
        first, *rest = value.splitlines() or [""]
        print(f"  {key:<{width}}  {first}")
        for line in rest:
            print(f"  {'':<{width}}  {line}")
    print("\n" + ("PASS: every artifact matches the PyTorch model" if ok else "FAIL: see above"))
    return 0 if ok else CHECK_FAILED


# --- moetrt optimize ---------------------------------------------------------------------------
def _optimize_arguments(p: argparse.ArgumentParser) -> None:
    from moetrt.optimize import cli as optimize_cli

    optimize_cli.add_arguments(p)


@command("optimize", "optimize an exported folder for ONNX Runtime (CPU/CUDA) or build a TensorRT engine",
         _optimize_arguments)
def _optimize(args: argparse.Namespace) -> int:
    """Optimize an exported folder for one target.

    ort-cpu / ort-cuda: lower the MoE ops to ONNX Runtime's fused MoE/QMoE where it measurably
    helps, optionally quantize the experts (int8/int4, weight-only) and convert precision
    (router, softmax and logits stay fp32); the folder keeps the export's inputs and outputs.
    trt: build a TensorRT engine folder with the moetrt plugins (needs TensorRT and a GPU).

    examples:
      moetrt optimize exported/tiny --target ort-cpu -o optimized/tiny
      moetrt optimize exported/tiny -t ort-cpu -o optimized/tiny-int4 --quantize-experts int4
      moetrt optimize exported/model -t trt -o engines/model --precision fp16
    """
    from moetrt.optimize import cli as optimize_cli
    from moetrt.runtime.model_folder import METADATA_FILE, check_artifact_files, explain_broken_artifact

    source = Path(args.source)
    if (source / METADATA_FILE).is_file():
        check_artifact_files(source, checksums=False)  # an incomplete folder fails now, not after minutes of work
    try:
        return optimize_cli.run(args)
    except MoetrtError:
        raise
    except Exception as exc:  # a corrupt or truncated model.onnx(.data) fails deep inside the ONNX reader
        explain_broken_artifact(source, exc)
        raise


# --- moetrt parity -----------------------------------------------------------------------------
def _parity_arguments(p: argparse.ArgumentParser) -> None:
    from moetrt.parity import cli as parity_cli

    parity_cli.add_arguments(p)


@command("parity", "check an artifact against the fp32 PyTorch model; exit 0 on pass, 4 on failure", _parity_arguments)
def _parity(args: argparse.Namespace) -> int:
    """Compare an exported (or optimized) artifact with the fp32 PyTorch reference.

    Logits, per-layer hidden states, KV cache and router decisions (as expert sets, near-ties
    reported rather than failed) are compared under the tolerance table; the first layer and
    op kind that leaves tolerance is named; greedy generation must agree or be explained by a
    near-tie. Exit code 0 on pass, 4 on failure (1 is a crash, 2 an input to fix), so it drops into CI.
    """
    from moetrt.parity import cli as parity_cli

    return parity_cli.run(args)


# --- moetrt serve ------------------------------------------------------------------------------
def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SRC",
                   help="an exported folder (moetrt export), a Hugging Face checkpoint folder, or a preset name (e.g. tiny)")
    p.add_argument("--backend", "-b", default="torch", choices=("torch", "ort", "trt"),
                   help="torch: the PyTorch model; ort: ONNX Runtime on an exported folder (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu; trt: cuda)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s, this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="the name clients pass as `model` (default: the preset's or the folder's name)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health")
    p.add_argument("--max-batch", type=int, default=16, metavar="N",
                   help="requests that share a forward pass (default: %(default)s; 1 runs one at a time)")
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="a request still running after this gets a 504 (default: %(default)s)")
    r = p.add_argument_group("Ray Serve replicas")
    r.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="serve N replicas on Ray Serve, each with its own copy of the model")
    r.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="an existing Ray cluster (e.g. ray://head:10001; default: start a local one)")
    r.add_argument("--replica-cpus", type=float, default=None, metavar="CPUS",
                   help="CPUs Ray reserves per replica (default: 1)")
    r.add_argument("--autoscaling", default=None, metavar="JSON",
                   help="Ray Serve autoscaling_config as JSON, e.g. '{\"min_replicas\": 1, \"max_replicas\": 4}'")


@command("serve", "serve a model over an OpenAI-compatible HTTP API", _serve_arguments)
def _serve(args: argparse.Namespace) -> int:
    """Serve a model over HTTP: POST /v1/completions and /v1/chat/completions (stream: true as
    server-sent events), GET /v1/models and /health, for any OpenAI client:

        moetrt serve exported/tiny --backend ort
        python -c "import openai; c = openai.OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-'); \\
                   print(c.completions.create(model='tiny', prompt='Return the ').choices[0].text)"

    Concurrent requests share forward passes (up to --max-batch). --replicas N deploys N copies
    on Ray Serve behind the same API. Runs until interrupted (Ctrl-C).
    """
    import json

    from moetrt.serve import serve

    if args.replicas is not None and args.replicas < 1:
        raise MoetrtError(f"--replicas must be >= 1, got {args.replicas}")
    if not 0 < args.port < 65536:
        raise MoetrtError(f"--port must be in 1..65535, got {args.port}")
    autoscaling = None
    if args.autoscaling is not None:
        try:
            autoscaling = json.loads(args.autoscaling)
        except json.JSONDecodeError as exc:
            raise MoetrtError(f"--autoscaling is not valid JSON ({exc}); e.g. '{{\"min_replicas\": 1, \"max_replicas\": 4}}'") from exc
        if not isinstance(autoscaling, dict):
            raise MoetrtError("--autoscaling must be a JSON object, e.g. '{\"min_replicas\": 1, \"max_replicas\": 4}'")
    where = f"http://{args.host}:{args.port}/v1"
    print(f"serving {args.source} ({args.backend}) at {where}; Ctrl-C stops", file=sys.stderr, flush=True)
    serve(args.source, backend=args.backend, device=args.device, host=args.host, port=args.port,
          model_name=args.model_name, api_key=args.api_key, max_batch=args.max_batch,
          request_timeout=args.request_timeout, replicas=args.replicas, ray_address=args.ray_address,
          autoscaling=autoscaling, replica_cpus=args.replica_cpus)
    return 0


# --- entry point -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from moetrt import __version__

    parser = argparse.ArgumentParser(
        prog="moetrt",
        description="Export Mixture-of-Experts transformers to ONNX with sparse top-k routing, "
        "run them on PyTorch / ONNX Runtime / TensorRT, and check numerical parity.",
    )
    parser.add_argument("--version", action="version", version=f"moetrt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in _COMMANDS.values():
        p = sub.add_parser(
            cmd.name, help=cmd.help, description=cmd.description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        cmd.arguments(p)
        p.set_defaults(run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``moetrt ARGV``; returns the exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: argparse prints them and exits with 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return args.run(args) or 0
        except MoetrtError as exc:
            return _error(exc.for_cli(), exc.exit_code)
        except KeyboardInterrupt:
            sys.stdout.flush()
            print("interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # `moetrt generate ... | head`
            sys.stderr.close()
            return 0
        except OSError as exc:  # the environment, not moetrt: a full disk, a read-only folder, ...
            return _error(_os_error_message(exc), 2)
        except Exception:  # noqa: BLE001 (a crash: print the traceback, exit 1)
            sys.stdout.flush()
            traceback.print_exc()
            from moetrt import __version__

            print(
                f"moetrt {__version__} crashed: this is a bug in moetrt, not in your input; please report it "
                "with the command line and the traceback above",
                file=sys.stderr,
            )
            return 1


def _error(message: str, code: int) -> int:
    sys.stdout.flush()  # what was printed so far comes before the error on a shared terminal
    print(f"error: {' '.join(message.split())}", file=sys.stderr)  # one line, whatever the message holds
    return code


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {' '.join(str(message).split())}", file=sys.stderr if file is None else file)


_OS_ERROR_HINTS = {
    getattr(errno, name): hint
    for name, hint in [
        ("ENOSPC", "free some disk space or write to another folder, then run again"),
        ("EDQUOT", "free some space within your disk quota or write to another folder, then run again"),
        ("EACCES", "check the permissions, or choose another folder"),
        ("EPERM", "check the permissions, or choose another folder"),
        ("EROFS", "the file system is read-only: choose another folder"),
        ("ENOENT", "check the path"),
        ("ENOMEM", "close other programs or use a machine with more memory"),
    ]
    if hasattr(errno, name)
}


def _os_error_message(exc: OSError) -> str:
    what = exc.strerror or str(exc) or type(exc).__name__
    where = f" ({exc.filename})" if exc.filename else ""
    hint = _OS_ERROR_HINTS.get(exc.errno, "check the paths and the disk, then run again")
    return f"{what}{where}; {hint}"


if __name__ == "__main__":
    sys.exit(main())
