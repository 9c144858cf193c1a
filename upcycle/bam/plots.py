"""BAM / BTX plot: held-out perplexity per domain and on average for every model (one group of bars per domain)."""

from __future__ import annotations

from pathlib import Path

from ..bench.plotting import pyplot, save_figure

LABELS = {"seed": "seed (dense)", "dense_continued": "dense continued (same compute)", "btx": "BTX",
          "bam_expert_kv": "BAM, expert KV", "bam_shared_kv": "BAM, shared KV"}  # fmt: skip


def plot_bam(runs: dict[str, dict], domains: list[str], path: Path, split: str = "test") -> Path:
    """``runs``: ``{run name: {model name: evaluation row}}`` (e.g. one per seed); bars show the mean over runs and
    the points each run. Branch models are left out (each is good at one domain only)."""
    plt = pyplot()
    first = next(iter(runs.values()))
    names = [n for n in LABELS if n in first]
    groups = [*domains, "average"]
    fig, ax = plt.subplots(figsize=(2.4 + 1.6 * len(groups), 4.6))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [[run[name][split][g] for run in runs.values()] for g in groups]
        xs = [g + (i - (len(names) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [sum(v) / len(v) for v in values], width, label=LABELS[name])
        for x, v in zip(xs, values, strict=True):
            ax.plot([x] * len(v), v, "k.", ms=3)
    ax.set_xticks(range(len(groups)), groups)
    ax.set(ylabel=f"held-out {split} perplexity (lower is better)", title=f"BAM vs BTX ({len(runs)} run(s))")
    low = min(run[n][split][g] for run in runs.values() for n in names for g in groups)
    ax.set_ylim(bottom=max(0.0, low * 0.8))
    ax.grid(axis="y", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # room for the legend under the axes
    save_figure(fig, path)
    return path
