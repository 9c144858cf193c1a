"""Training metrics: rows in ``metrics.csv``, scalars in TensorBoard (``tb/``, the ``tensorboard`` extra), curves as
``curves.png``.

On resume the CSV keeps only rows up to the resumed step, so an interrupted and resumed run leaves the same file
as an uninterrupted one.
"""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path

from .._optional import available, install_hint

FIELDS = ("step", "split", "loss", "accuracy", "perplexity", "lr", "items_per_s", "aux", "sparsity", "router_fit")


class MetricsLog:
    def __init__(self, out: Path, enabled: bool, resume_step: int = 0):
        self.path, self.enabled = out / "metrics.csv", enabled
        self.writer = None
        if not enabled:
            return
        rows = self.rows() if resume_step else []
        kept = [row for row in rows if int(row["step"]) <= resume_step]
        with open(self.path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, FIELDS)
            writer.writeheader()
            writer.writerows(kept)
        if available("tensorboard"):
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard hides events at purge_step and after; the resumed step's own are kept, as in the CSV
            self.writer = SummaryWriter(str(out / "tb"), purge_step=resume_step + 1 if resume_step else None)
        else:  # an optional extra: the run goes on with metrics.csv and curves.png
            hint = install_hint("tensorboard")
            warnings.warn(f"TensorBoard logs are skipped, tensorboard is not installed: {hint}", stacklevel=2)

    def log(self, step: int, split: str, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "split": split, **{k: _fmt(v) for k, v in values.items() if k in FIELDS}}
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, FIELDS).writerow(row)
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, int | float):
                    self.writer.add_scalar(f"{split}/{key}", value, step)

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as handle:
            return list(csv.DictReader(handle))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def plot(self, metric: str) -> Path | None:
        """Loss and ``metric`` against steps, train and validation, in one PNG."""
        rows = self.rows()
        if not self.enabled or not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for ax, key in zip(axes, ("loss", metric), strict=True):
            for split, style in (("train", "-"), ("val", "o-")):
                points = [(int(r["step"]), float(r[key])) for r in rows if r["split"] == split and r.get(key)]
                if points:
                    ax.plot(*zip(*points, strict=True), style, label=split, markersize=4)
            ax.set_xlabel("step")
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
            ax.legend()
        if metric == "perplexity":
            axes[1].set_yscale("log")
        fig.tight_layout()
        path = self.path.with_name("curves.png")
        tmp = path.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
        plt.close(fig)
        return path


def _fmt(value):
    return f"{value:.6g}" if isinstance(value, float) else value
