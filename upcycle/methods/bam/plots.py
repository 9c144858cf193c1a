"""BAM / BTX plots: held-out perplexity per domain and on average for every model (one group of bars per domain),
and the experts each domain uses in every mixture (heatmaps, domains × experts)."""

from __future__ import annotations

from pathlib import Path

from ...plotting import pyplot, save_figure

LABELS = {"seed": "seed (dense)", "dense_mix_compute": "dense, mix-phase compute",
          "dense_same_tokens": "dense, same tokens", "dense_continued": "dense, all of BAM's compute", "btx": "BTX",
          "bam_expert_kv": "BAM, expert KV", "bam_shared_kv": "BAM, shared KV",
          "bam_expert_kv_cm": "BAM expert KV, BTX's compute",
          "bam_shared_kv_cm": "BAM shared KV, BTX's compute"}  # fmt: skip


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


def plot_usage(results: dict[str, dict], domains: list[str], path: Path) -> Path:
    """A row per mixture in ``results`` (``{model name: evaluation row}``), a heatmap per router (FFN, attention):
    rows are the domains of the held-out text, columns the experts (seed, then the branches), values the share of
    FFN assignments or the mean attention-router weight."""
    plt = pyplot()
    mixtures = [(name, row["expert_usage"]) for name, row in results.items() if "expert_usage" in row]
    fig, axes = plt.subplots(len(mixtures), 2, figsize=(8.0, 0.9 + 2.0 * len(mixtures)), squeeze=False,
                             layout="constrained")  # fmt: skip
    experts = ["seed", *domains]
    for row, ((name, usage), row_axes) in enumerate(zip(mixtures, axes, strict=True)):
        for ax, kind in zip(row_axes, ("ffn", "attention"), strict=True):
            if usage[domains[0]][kind] is None:
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"{LABELS.get(name, name)}: attention averaged, no experts", ha="center",
                        va="center", fontsize=8, transform=ax.transAxes)  # fmt: skip
                continue
            matrix = [usage[d][kind] for d in domains]
            image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            for i, values in enumerate(matrix):
                for j, value in enumerate(values):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                            color="w" if value < 0.6 else "k")  # fmt: skip
            last_row, first_column = row == len(mixtures) - 1, kind == "ffn"
            ax.set_xticks(range(len(experts)), experts if last_row else [], fontsize=7, rotation=20, ha="right")
            ax.set_yticks(range(len(domains)), domains if first_column else [], fontsize=7)
            what = "FFN experts (share of assignments)" if kind == "ffn" else "attention experts (mean weight)"
            ax.set_title(f"{LABELS.get(name, name)}: {what}", fontsize=8)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6)
    fig.supxlabel("expert (the model it was copied from)", fontsize=8)
    fig.supylabel("held-out text (validation)", fontsize=8)
    save_figure(fig, path)
    return path
