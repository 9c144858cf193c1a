"""Plots of ``upcycle bench jetpack``: validation accuracy per epoch for each column, and the ablation bars."""

from __future__ import annotations

import statistics
from pathlib import Path

from ...plotting import pyplot, save_figure

LABELS = {"dense_scratch": "dense, scratch", "dense_pretrained": "dense, pre-trained",
          "softmoe_scratch": "Soft MoE, scratch", "jetpack": "MoE Jetpack",
          "sparse_upcycling": "sparse upcycling (SpheroMoE)"}  # fmt: skip


def plot_curves(rows: list[dict], columns, path: Path) -> None:
    """One panel per (family, downstream set): validation accuracy per epoch, mean over seeds with a min–max band."""
    plt = pyplot()
    panels = list(dict.fromkeys((r["family"], r["data"]) for r in rows if r["kind"] == "main"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (family, data) in zip(axes[0], panels, strict=True):
        for column in columns:
            runs = [
                r
                for r in rows
                if r["kind"] == "main" and (r["family"], r["data"], r["column"]) == (family, data, column)
            ]
            curves = list(zip(*(r["val_curve"] for r in runs), strict=True))
            mean = [statistics.mean(values) for values in curves]
            low, high = [min(values) for values in curves], [max(values) for values in curves]
            epochs = range(1, len(mean) + 1)
            ax.plot(epochs, mean, marker="o", markersize=3, label=LABELS[column])
            ax.fill_between(epochs, low, high, alpha=0.15)
        ax.set_title(f"{family} on {data}: validation accuracy ({len(runs)} seed(s), band = min–max)", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("MoE Jetpack vs dense and Soft MoE at equal epochs (CPU scale)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def plot_ablation(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    rows = sorted(rows, key=lambda r: r["val"])
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(rows) + 1.5))
    positions = range(len(rows))
    ax.barh([p - 0.2 for p in positions], [r["val"] for r in rows], height=0.38, label="validation (chooses)")
    ax.barh([p + 0.2 for p in positions], [r["test"] for r in rows], height=0.38, label="test (reported)")
    ax.set_yticks(list(positions), [r["variant"] for r in rows], fontsize=8)
    low = min(min(r["val"], r["test"]) for r in rows) if rows else 0.0
    ax.set_xlim(max(0.0, low - 0.05), 1.0)
    ax.set_xlabel("accuracy")
    where = f"{rows[0]['data']}, seed {rows[0]['seed']}" if rows else "-"
    ax.set_title(f"MoE Jetpack ablation ({where})", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
