"""The figure and the README table of ``upcycle bench convert``."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..atomic import atomic_write_text
from .convert_jobs import GOAL_PEAK_RSS_GB, GOAL_SECONDS, MERGE_FACTOR

PEAK_RSS_TARGET_GB = 1.0  # the synthetic checkpoint's target: less than half of its 2.2 GB
MARKERS = ("<!-- convert -->", "<!-- /convert -->")
CASES = {"synthetic": "synthetic Llama fp32", "smollm2": "SmolLM2-135M"}


def plot(rows: list[dict], path: Path, job_source: str = "SmolLM2-135M") -> None:
    """Left: peak memory against checkpoint size (streaming rows). Right: the side-by-side jobs' seconds and peak
    RSS against their goals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streamed = [r for r in rows if "baseline_rss_gb" in r]
    jobs = [r for r in rows if "what" in r]
    widths = [1.3, 1, 1] if jobs else [1]
    fig, axes = plt.subplots(1, len(widths), figsize=(7.5 + 6 * bool(jobs), 4.8), width_ratios=widths, squeeze=False)
    plot_streaming(axes[0][0], streamed)
    if jobs:
        plot_jobs(axes[0][1], axes[0][2], jobs, job_source)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


def plot_streaming(ax, rows: list[dict]) -> None:
    labels = [f"{r['case']}\n{r['num_experts']} experts, top-{r['top_k']}" for r in rows]
    x = range(len(rows))
    width = 0.26
    ax.bar([i - width for i in x], [r["source_gb"] for r in rows], width, color="tab:gray", label="source checkpoint")
    ax.bar(list(x), [r["output_gb"] for r in rows], width, color="tab:blue", label="output (MoE)")
    # peak RSS = the interpreter with torch and transformers' config machinery + what the conversion adds
    right = [i + width for i in x]
    base = [r["baseline_rss_gb"] for r in rows]
    ax.bar(right, base, width, color="navajowhite", label="peak RSS: after imports")
    added = [r["peak_rss_gb"] - r["baseline_rss_gb"] for r in rows]
    bars = ax.bar(right, added, width, bottom=base, color="tab:orange", label="peak RSS: added by the conversion")
    for bar, row in zip(bars, rows, strict=True):
        label = f"{row['peak_rss_gb']:.2f} GB\n{row['seconds']:.0f} s"
        ax.text(bar.get_x() + width / 2, row["peak_rss_gb"] + 0.05, label, ha="center", va="bottom", fontsize=7,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})  # fmt: skip
    target = f"{PEAK_RSS_TARGET_GB} GB target"
    ax.axhline(PEAK_RSS_TARGET_GB, color="tab:red", linestyle="--", linewidth=1, label=target)
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("GB")
    ax.set_title("Streaming conversion: peak memory vs checkpoint size (fp32)", fontsize=9)
    ax.legend(fontsize=7)


def plot_jobs(seconds_ax, memory_ax, rows: list[dict], source: str) -> None:
    """Horizontal bars per job (streamed: blue, in memory: gray) with the job's and the merges' goal lines."""
    labels = [r["case"].replace("_", " ") for r in rows]
    colors = ["tab:blue" if r["case"].endswith("stream") else "tab:gray" for r in rows]
    y = list(range(len(rows)))[::-1]
    for ax, key, goal, unit in ((seconds_ax, "seconds", GOAL_SECONDS, "s"),
                                (memory_ax, "peak_rss_gb", GOAL_PEAK_RSS_GB, "GB")):  # fmt: skip
        values = [r[key] for r in rows]
        ax.barh(y, values, color=colors)
        for yi, value in zip(y, values, strict=True):
            ax.text(value, yi, f" {value:.1f}", va="center", fontsize=7)
        ax.axvline(goal, color="tab:red", linestyle="--", linewidth=1, label=f"job goal {goal:g} {unit}")
        ax.axvline(MERGE_FACTOR * goal, color="tab:purple", linestyle=":", linewidth=1,
                   label=f"merge goal {MERGE_FACTOR * goal:g} {unit}")  # fmt: skip
        ax.set_yticks(y, labels if ax is seconds_ax else [""] * len(y), fontsize=8)
        ax.set_xlim(0, 1.15 * max(*values, MERGE_FACTOR * goal))  # room for the value labels
        ax.set_xlabel("wall seconds (whole command)" if key == "seconds" else "peak RSS (GB)", fontsize=8)
        ax.legend(fontsize=7, loc="upper right")  # the streamed rows on top are the short ones
    seconds_ax.set_title(f"{source} -> 4 experts (blue: streamed)", fontsize=9)
    memory_ax.set_title("2 CPU cores", fontsize=9)


def readme_table(rows: list[dict], load_average: list[float]) -> str:
    """The markdown that goes between the README's convert markers."""
    lines = ["| case | source | output | seconds | peak RSS |", "|---|---|---|---|---|"]
    for r in rows:
        if "what" in r:
            continue
        target = f" (target ≤ {PEAK_RSS_TARGET_GB})" if r["case"] == "synthetic" else ""
        peak = f"**{r['peak_rss_gb']} GB**{target}" if target else f"{r['peak_rss_gb']} GB"
        case = f"{CASES.get(r['case'], r['case'])} → {r['num_experts']} experts"
        lines.append(f"| {case} | {r['source_gb']} GB | {r['output_gb']} GB | {r['seconds']} | {peak} |")
    jobs = [r for r in rows if "what" in r]
    if jobs:
        lines += ["", "SmolLM2-135M → 4 experts, whole commands (interpreter start and imports included); goal: the "
                  f"streamed job ≤ {GOAL_SECONDS:g} s and ≤ {GOAL_PEAK_RSS_GB:g} GB, the streamed merges within "
                  f"{MERGE_FACTOR:g}× that:", "",
                  "| job | seconds | peak RSS | output | goal |", "|---|---|---|---|---|"]  # fmt: skip
        for r in jobs:
            goal = "" if "goal_met" not in r else ("met" if r["goal_met"] else "**not met**")
            lines.append(f"| {r['what']} | {r['seconds']} | {r['peak_rss_gb']} GB | {r['output_gb']} GB "
                         f"{r['output_class']} | {goal} |")  # fmt: skip
    lines += ["", f"Load average while measuring: {', '.join(f'{x:g}' for x in load_average)} (2 cores); seconds "
              "stretch on a busy machine, peak RSS does not."]  # fmt: skip
    return "\n".join(lines)


def write_readme_section(path: Path, rows: list[dict], load_average: list[float]) -> None:
    """Replace what sits between the convert markers of ``path``; a file without them is left alone."""
    if not path.is_file():
        return
    text = path.read_text()
    if MARKERS[0] not in text or MARKERS[1] not in text:
        return
    pattern = re.compile(re.escape(MARKERS[0]) + ".*?" + re.escape(MARKERS[1]), re.DOTALL)
    section = f"{MARKERS[0]}\n{readme_table(rows, load_average)}\n{MARKERS[1]}"
    atomic_write_text(path, pattern.sub(lambda _: section, text, count=1))
