"""The parity report: results, and its JSON / Markdown / PNG forms.

JSON schema ``moetrt.parity.report``, version 1 (``report.json``). Fields are only ever added
within a version; a rename or removal bumps ``schema_version``. Errors are absolute
(``max_abs``) and relative to the reference element (``max_rel``), both maxima over all inputs.

```
{
  "schema": "moetrt.parity.report", "schema_version": 1,
  "passed": bool,                              # every back end passed
  "reference": str, "artifact": str,           # what was compared
  "dtype": "fp32" | "fp16" | "bf16",           # the artifact's dtype: selects the tolerances
  "tolerances": {kind: {"atol", "rtol", "reason"}},   # kinds of moetrt.parity.tolerances.KINDS
  "inputs": [{"name", "batch", "new_tokens", "past"}],
  "versions": {package: version},
  "backends": {
    "ort" | "trt": {
      "backend": str, "passed": bool,
      "failures": [str],                       # one sentence per failed check
      "first_failure": null | {"checkpoint", "layer", "kind", "max_abs", "atol", "rtol", "message"},
      "checkpoints": [                         # forward order; see moetrt.parity.checkpoints
        {"name", "point", "layer", "kind", "tolerance_kind",
         "max_abs", "max_rel", "atol", "rtol", "passed"}   # router_indices: errors null
      ],
      "missing_checkpoints": [str],            # reference checkpoints the artifact does not expose
      "layers": [{"layer", "moe", "passed", "max_abs", "worst_checkpoint", "router_agreement"}],
      "router": [{"layer", "tokens", "agreement", "matches", "near_ties", "failures", "passed",
                  "events": [{"layer", "input", "step", "token", "reference", "artifact", "gap", "near_tie"}]}],
      "generation": null | {"steps", "prompt", "reference_tokens", "artifact_tokens", "agreement",
                            "diverged_at", "explanation", "near_ties", "router_failures", "passed", "message"}
    }
  }
}
```
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from moetrt.state import PRESENT_PREFIX

from .generation import GenerationResult
from .router import RouterLayerResult
from .tolerances import Tolerance

__all__ = ["SCHEMA", "SCHEMA_VERSION", "CheckpointResult", "BackendResult", "ParityReport"]

SCHEMA, SCHEMA_VERSION = "moetrt.parity.report", 1


def _num(x: float | None) -> float | None:
    """JSON has no inf/NaN: report them as None (a NaN error is a failure anyway)."""
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass
class CheckpointResult:
    name: str
    point: str
    layer: int | None
    kind: str
    tolerance_kind: str | None
    max_abs: float | None
    max_rel: float | None
    atol: float | None
    rtol: float | None
    passed: bool

    def to_dict(self) -> dict:
        return {"name": self.name, "point": self.point, "layer": self.layer, "kind": self.kind,
                "tolerance_kind": self.tolerance_kind, "max_abs": _num(self.max_abs), "max_rel": _num(self.max_rel),
                "atol": self.atol, "rtol": self.rtol, "passed": self.passed}


@dataclass
class BackendResult:
    backend: str
    checkpoints: list[CheckpointResult]
    router: list[RouterLayerResult]
    generation: GenerationResult | None = None
    missing_checkpoints: list[str] = field(default_factory=list)
    num_layers: int = 0
    moe_layers: list[int] = field(default_factory=list)

    @property
    def first_failure(self) -> CheckpointResult | None:
        """The first checkpoint, in forward order, that leaves tolerance: where the artifact goes wrong."""
        return next((c for c in self.checkpoints if not c.passed), None)

    @property
    def failures(self) -> list[str]:
        out = []
        first = self.first_failure
        if first is not None:
            out.append(self.describe(first))
            bad = [c.name for c in self.checkpoints if not c.passed and c is not first]
            if bad:
                out.append(f"{len(bad)} later checkpoint(s) also leave tolerance: {', '.join(bad[:8])}"
                           + (" ..." if len(bad) > 8 else ""))
        for r in self.router:
            if r.failures:
                worst = next(e for e in r.events if not e.near_tie) if any(not e.near_tie for e in r.events) else None
                detail = (f"; e.g. token {worst.token}: reference experts {worst.reference}, artifact {worst.artifact}, "
                          f"score gap {worst.gap:.2e}" if worst else "")
                out.append(f"layer {r.layer} router: {r.failures}/{r.tokens} tokens routed to other experts "
                           f"beyond a near-tie{detail}")
        if self.generation is not None and not self.generation.passed:
            out.append(f"generation: {self.generation.message}")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures

    @staticmethod
    def describe(c: CheckpointResult) -> str:
        where = f"layer {c.layer} {c.kind}" if c.layer is not None else c.kind
        if c.point == "router_indices":
            return f"first divergence: {where} ({c.name}): expert choices differ beyond a near-tie"
        return (f"first divergence: {where} ({c.name}): max abs error {c.max_abs:.3e} exceeds atol {c.atol:g} "
                f"and rtol {c.rtol:g}")

    def layer_rows(self) -> list[dict]:
        rows = []
        router = {r.layer: r for r in self.router}
        for layer in range(self.num_layers):
            own = [c for c in self.checkpoints if c.layer == layer]
            errors = [c for c in own if c.max_abs is not None and c.tolerance_kind in ("hidden",)]
            worst = max(errors, key=lambda c: (c.max_abs / c.atol) if c.atol else c.max_abs, default=None)
            output = next((c for c in own if c.point == "output"), None)
            rows.append({
                "layer": layer, "moe": layer in self.moe_layers, "passed": all(c.passed for c in own),
                "max_abs": _num(output.max_abs if output else (worst.max_abs if worst else None)),
                "worst_checkpoint": worst.name if worst else None,
                "router_agreement": router[layer].agreement if layer in router else None,
            })
        return rows

    def to_dict(self) -> dict:
        first = self.first_failure
        return {
            "backend": self.backend, "passed": self.passed, "failures": self.failures,
            "first_failure": None if first is None else {
                "checkpoint": first.name, "layer": first.layer, "kind": first.kind, "max_abs": _num(first.max_abs),
                "atol": first.atol, "rtol": first.rtol, "message": self.describe(first),
            },
            "checkpoints": [c.to_dict() for c in self.checkpoints],
            "missing_checkpoints": self.missing_checkpoints,
            "layers": self.layer_rows(),
            "router": [r.to_dict() for r in self.router],
            "generation": None if self.generation is None else self.generation.to_dict(),
        }


@dataclass
class ParityReport:
    reference: str
    artifact: str
    dtype: str
    tolerances: dict[str, Tolerance]
    inputs: list[dict]
    backends: dict[str, BackendResult]
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(b.passed for b in self.backends.values())

    @property
    def exit_code(self) -> int:
        """0 when every check passed, :data:`moetrt.errors.CHECK_FAILED` (4) otherwise (for CI)."""
        from moetrt.errors import CHECK_FAILED

        return 0 if self.passed else CHECK_FAILED

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "passed": self.passed,
            "reference": self.reference, "artifact": self.artifact, "dtype": self.dtype,
            "tolerances": {k: t.to_dict() for k, t in self.tolerances.items()},
            "inputs": self.inputs, "versions": self.versions,
            "backends": {name: b.to_dict() for name, b in self.backends.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        """A few lines for a terminal: the verdict per back end and why."""
        lines = []
        for name, b in self.backends.items():
            logits = next((c for c in b.checkpoints if c.name == "logits"), None)
            err = f", logits max abs {logits.max_abs:.2e}" if logits and logits.max_abs is not None else ""
            near = sum(r.near_ties for r in b.router)
            lines.append(f"[{name}] {'PASS' if b.passed else 'FAIL'} ({self.dtype}{err}, "
                         f"{near} router near-tie(s) reported)")
            lines += [f"  - {f}" for f in b.failures]
            if b.generation is not None and b.generation.passed:
                lines.append(f"  generation: {b.generation.message}")
        return "\n".join(lines)

    def markdown(self) -> str:
        out = [f"# Parity report: {'PASS' if self.passed else 'FAIL'}", "",
               f"- reference: `{self.reference}` (fp32 PyTorch)", f"- artifact: `{self.artifact}` ({self.dtype})",
               "- inputs: " + "; ".join(f"{i['name']} batch {i['batch']} x {i['new_tokens']} tokens, past {i['past']}"
                                        for i in self.inputs), ""]
        for name, b in self.backends.items():
            out += [f"## {name}: {'PASS' if b.passed else 'FAIL'}", ""]
            if b.failures:
                out += [f"- {f}" for f in b.failures] + [""]
            graph_outputs = [c for c in b.checkpoints if c.point == "logits" or c.point.startswith(PRESENT_PREFIX)]
            if graph_outputs:
                kv = [c for c in graph_outputs if c.point != "logits"]
                logits = [c for c in graph_outputs if c.point == "logits"]
                out += ["| output | max abs | atol | rtol | verdict |", "|---|---|---|---|---|"]
                for label, group in (("logits", logits), ("present KV (worst layer)", kv)):
                    if group:
                        worst = max(group, key=lambda c: c.max_abs or 0.0)
                        out.append(f"| {label} | {_fmt(worst.max_abs)} | {worst.atol:g} | {worst.rtol:g} | "
                                   f"{'ok' if all(c.passed for c in group) else 'FAIL'} |")
                out.append("")
            out += ["| layer | type | max abs (layer output) | worst checkpoint | router agreement | near-ties | "
                    "routing failures | verdict |", "|---|---|---|---|---|---|---|---|"]
            router = {r.layer: r for r in b.router}
            for row in b.layer_rows():
                r = router.get(row["layer"])
                out.append(
                    f"| {row['layer']} | {'MoE' if row['moe'] else 'dense'} | {_fmt(row['max_abs'])} | "
                    f"{row['worst_checkpoint'] or '-'} | {f'{r.agreement:.1%}' if r else '-'} | "
                    f"{r.near_ties if r else '-'} | {r.failures if r else '-'} | {'ok' if row['passed'] else 'FAIL'} |")
            out.append("")
            if b.missing_checkpoints:
                out += [f"Not compared (the artifact does not expose them): {', '.join(b.missing_checkpoints)}", ""]
            if b.generation is not None:
                g = b.generation
                out += [f"Generation ({g.steps} greedy steps): {g.message}.", ""]
        out += ["## Tolerances", "", "| kind | atol | rtol | reason |", "|---|---|---|---|"]
        out += [f"| {k} | {t.atol:g} | {t.rtol:g} | {t.reason} |" for k, t in self.tolerances.items()]
        return "\n".join(out) + "\n"

    def plot(self, path: str | Path) -> Path:
        """A PNG: per back end, the per-layer max error (log scale) beside the router agreement per MoE layer."""
        path = Path(path)
        self.figure().savefig(path, dpi=100)
        return path

    def figure(self):
        """The matplotlib ``Figure`` that :meth:`plot` saves; legends sit beside the axes, never over bars."""
        from matplotlib.figure import Figure

        rows = max(1, len(self.backends))
        fig = Figure(figsize=(11, 3.6 * rows), layout="constrained")
        axes = fig.subplots(rows, 2, squeeze=False)
        hidden = self.tolerances.get("hidden")
        for (name, b), (ax_err, ax_router) in zip(self.backends.items(), axes):
            layer_rows = b.layer_rows()
            layers = [r["layer"] for r in layer_rows]
            errors = [r["max_abs"] if r["max_abs"] else float("nan") for r in layer_rows]
            colors = ["tab:blue" if r["passed"] else "tab:red" for r in layer_rows]
            ax_err.bar(layers, [max(e, 1e-12) for e in errors], color=colors)
            if hidden is not None:
                ax_err.axhline(hidden.atol, color="black", linestyle="--", linewidth=1, label=f"atol {hidden.atol:g}")
                ax_err.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
            ax_err.set_yscale("log")
            ax_err.set_xlabel("layer")
            ax_err.set_ylabel("max abs error (layer output)")
            ax_err.set_title(f"{name}: per-layer error vs fp32 reference ({self.dtype})")
            ax_err.set_xticks(layers)
            moe = [r.layer for r in b.router]
            exact = [r.agreement for r in b.router]
            near = [r.near_ties / r.tokens if r.tokens else 0.0 for r in b.router]
            fail = [r.failures / r.tokens if r.tokens else 0.0 for r in b.router]
            ax_router.bar(moe, exact, color="tab:green", label="same experts")
            ax_router.bar(moe, near, bottom=exact, color="tab:orange", label="near-tie")
            ax_router.bar(moe, fail, bottom=[a + n for a, n in zip(exact, near)], color="tab:red", label="failure")
            ax_router.set_ylim(0, 1.05)
            ax_router.set_xlabel("MoE layer")
            ax_router.set_ylabel("fraction of tokens")
            ax_router.set_title(f"{name}: router agreement")
            ax_router.set_xticks(moe)
            ax_router.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        return fig

    def write(self, folder: str | Path) -> dict[str, Path]:
        """Write ``report.json``, ``report.md`` and ``parity.png`` into ``folder`` (created if needed)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"json": folder / "report.json", "markdown": folder / "report.md", "plot": folder / "parity.png"}
        paths["json"].write_text(self.to_json() + "\n")
        paths["markdown"].write_text(self.markdown())
        self.plot(paths["plot"])
        return paths


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"
