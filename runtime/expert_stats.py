"""Expert statistics: how many tokens each expert of each MoE layer received during generation.

Collected from the router outputs (``router_indices.{i}``, int32 ``[B*S, K]``) of every step,
counting only real tokens (not left padding, not rows that already stopped). Per layer, the
counts sum to ``tokens * K``; the load imbalance is ``max / mean`` of the counts (1.0 is a
perfectly even load, ``E / K`` the worst: every token on the same K experts).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moetrt.runtime.backend import ModelSpec, router_names

__all__ = ["ExpertStats"]

_SPARK = "▁▂▃▄▅▆▇█"
_NUMERIC_COLUMNS_MAX = 16  # experts per layer up to which the table prints every count


@dataclass
class ExpertStats:
    layers: list[int]  # MoE layer indices, one row each
    num_experts: int  # E
    experts_per_token: int  # K
    counts: np.ndarray  # int64 [L, E]: tokens routed to each expert
    tokens: int = 0  # tokens routed through each layer

    @classmethod
    def empty(cls, spec: ModelSpec) -> ExpertStats:
        counts = np.zeros((len(spec.moe_layers), spec.num_experts), dtype=np.int64)  # [L, E]
        return cls(list(spec.moe_layers), spec.num_experts, spec.experts_per_token, counts)

    def add(self, outputs: dict[str, Any], keep: np.ndarray) -> None:
        """Count one step's routings; ``keep`` bool ``[B*S]`` marks the real tokens (row-major over [B, S])."""
        keep = np.asarray(keep, dtype=bool).reshape(-1)  # [T]
        for row, layer in enumerate(self.layers):
            indices = np.asarray(outputs[router_names(layer)[1]])  # [T, K]
            assert indices.shape == (keep.size, self.experts_per_token), (indices.shape, keep.size)
            chosen = indices[keep].reshape(-1)  # [T_kept * K]
            self.counts[row] += np.bincount(chosen, minlength=self.num_experts)[: self.num_experts]
        self.tokens += int(keep.sum())

    @property
    def imbalance(self) -> np.ndarray:
        """``max / mean`` of the tokens per expert, per layer: float64 [L] (NaN before any token)."""
        mean = self.counts.mean(axis=1)  # [L]
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.counts.max(axis=1) / mean

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "experts_per_token": self.experts_per_token,
            "layers": {
                str(layer): {"tokens_per_expert": self.counts[row].tolist(), "imbalance": float(self.imbalance[row])}
                for row, layer in enumerate(self.layers)
            },
        }

    def table(self) -> str:
        """A text table: per layer the load imbalance, the tokens per expert and a bar of the load."""
        numeric = self.num_experts <= _NUMERIC_COLUMNS_MAX
        width = max(len(str(int(self.counts.max(initial=0)))), 2) + 1
        header = f"{'layer':>5}  {'max/mean':>8}  "
        if numeric:
            header += "".join(f"{'e' + str(e):>{width}}" for e in range(self.num_experts)) + "  "
        else:
            header += f"{'busiest':>12}  "
        header += "load by expert"
        title = (
            f"expert load: {self.tokens} tokens x top-{self.experts_per_token} = "
            f"{self.tokens * self.experts_per_token} routings per layer, {self.num_experts} experts"
        )
        lines = [title, header]
        for row, layer in enumerate(self.layers):
            counts = self.counts[row]
            line = f"{layer:>5}  {self.imbalance[row]:>8.2f}  "
            if numeric:
                line += "".join(f"{int(c):>{width}}" for c in counts) + "  "
            else:
                top = int(counts.argmax())
                line += f"{f'e{top} ({int(counts[top])})':>12}  "
            lines.append(line + _sparkline(counts))
        return "\n".join(lines)

    def heatmap(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """Save a PNG heat map (layers x experts) of each expert's load relative to an even split."""
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as exc:
            from moetrt.errors import BackendMissingError

            raise BackendMissingError("the expert heat map needs matplotlib: pip install matplotlib") from exc
        even = max(self.tokens * self.experts_per_token / self.num_experts, 1e-12)
        load = self.counts / even  # [L, E], 1.0 = an even share
        fig, ax = plt.subplots(
            figsize=(max(5.5, 0.4 * self.num_experts + 2.5), max(3.0, 0.4 * len(self.layers) + 1.8))
        )
        try:
            image = ax.imshow(load, aspect="auto", cmap="viridis", interpolation="nearest")
            ax.set_xlabel("expert")
            ax.set_ylabel("MoE layer")
            ax.set_yticks(range(len(self.layers)), [str(layer) for layer in self.layers])
            if self.num_experts <= 32:
                ax.set_xticks(range(self.num_experts))
            if self.counts.size <= 256:  # small enough to print each count in its cell
                middle = (load.min() + load.max()) / 2
                for (row, expert), count in np.ndenumerate(self.counts):
                    color = "black" if load[row, expert] > middle else "white"  # readable on viridis
                    ax.text(expert, row, str(count), ha="center", va="center", fontsize=7, color=color)
            ax.set_title(title or f"expert load ({self.tokens} tokens, top-{self.experts_per_token})")
            fig.colorbar(image, ax=ax, label="load (1.0 = even)")
            fig.tight_layout()
            path = Path(path)
            fig.savefig(path, dpi=120)
        finally:
            plt.close(fig)
        return path


def _sparkline(counts: np.ndarray) -> str:
    top = counts.max(initial=0)
    if top == 0:
        return _SPARK[0] * len(counts)
    levels = np.minimum((counts / top * (len(_SPARK) - 1)).round().astype(int), len(_SPARK) - 1)
    return "".join(_SPARK[level] for level in levels)
