"""``upcycle bench upcycling``'s figure: per domain the validation perplexity of every column from step 0 (before
any update) to the end, and the routers' balance (each MoE column's mean normalised load entropy and largest expert
share over its layers)."""

from __future__ import annotations

from pathlib import Path

from ..plotting import pyplot, save_figure


def plot_upcycling(rows: list[dict], domains: tuple[str, ...], path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(domains) + 1, figsize=(4.2 * (len(domains) + 1), 4.4))
    for ax, domain in zip(axes, domains, strict=False):
        for row in rows:
            steps = [point["step"] for point in row["val_curve"]]
            style = "--" if row["column"] in ("cmoe", "moefication") else "-"  # a quarter of the FFN active
            ax.plot(steps, [point[domain] for point in row["val_curve"]], style, marker=".", label=row["column"])
        ax.set(title=f"{domain} (validation)", xlabel="training step", ylabel="perplexity (lower is better)",
               yscale="log")  # fmt: skip
        ax.grid(alpha=0.3)
    ax = axes[-1]
    moe = [row for row in rows if row["load"] is not None]
    xs = range(len(moe))
    ax.bar([x - 0.2 for x in xs], [row["load"]["mean_load_entropy"] for row in moe], 0.4, label="load entropy / log e")
    ax.bar([x + 0.2 for x in xs], [row["load"]["max_load_share"] for row in moe], 0.4, label="largest expert share")
    ax.scatter(list(xs), [row["load"]["uniform_share"] for row in moe], marker="_", s=200, color="k",
               label="uniform share 1/e", zorder=3)  # fmt: skip
    ax.set_xticks(list(xs), [row["column"] for row in moe], rotation=35, ha="right", fontsize=7)
    ax.set(title="expert load after training (validation)", ylim=(0, 1.4))  # headroom for the legend
    ax.legend(fontsize=7, loc="upper right")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))  # room for the legend under the axes
    save_figure(fig, path)
    return path
