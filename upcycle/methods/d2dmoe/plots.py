"""D2DMoE plots: accuracy vs compute (one panel per model), and FFN wall-clock speed-up vs τ."""

from __future__ import annotations

from pathlib import Path

from ...plotting import pyplot, save_figure

STYLES = {"d2dmoe": ("D2DMoE (τ sweep)", "o-"), "d2dmoe_attention": ("D2DMoE + attention projections", "s-"),
          "moefication": ("MoEfication (k sweep)", "^--")}  # fmt: skip


def plot_curves(panels: dict[str, dict], path: Path, split: str = "test") -> Path:
    """One panel per model (``{"dense": {split: metric}, "variants": {name: sweep rows}}``): accuracy vs MACs as a
    fraction of the dense model's, the dense model as a star."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.8 * len(panels), 4.4), squeeze=False)
    for ax, (name, panel) in zip(axes[0], panels.items(), strict=True):
        for variant, rows in panel["variants"].items():
            label, style = STYLES[variant]
            ordered = sorted(rows, key=lambda row: row["flops_fraction"])
            ax.plot([r["flops_fraction"] for r in ordered], [r[split] for r in ordered], style, label=label, ms=4)
        ax.plot([1.0], [panel["dense"][split]], "k*", ms=12, label="dense (original)")
        ax.axhline(panel["dense"][split] - 0.01, color="grey", lw=0.8, ls=":", label="dense − 1 point")
        ax.set(title=name, xlabel="MACs per example / dense model's", ylabel=f"{split} accuracy")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)
    return path


def plot_timing(panels: dict[str, list[dict]], path: Path) -> None:
    """One panel per model (``{name: timing rows}``): FFN-layer and whole-model speed-up over the dense model vs τ,
    measured, and each one's ideal (the MAC ratio)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.8 * len(panels), 4.2), squeeze=False)
    for ax, (name, rows) in zip(axes[0], panels.items(), strict=True):
        taus = [r["tau"] for r in rows]
        ax.plot(taus, [r["ideal_ffn_speedup"] for r in rows], "k--", label="ideal (dense FFN MACs / MoE FFN MACs)")
        ax.plot(taus, [r["ffn_speedup"] for r in rows], "o-", label="measured FFN layers (CPU, one test batch)")
        ax.plot(taus, [r["model_speedup"] for r in rows], "s:", label="measured whole model")
        ax.plot(taus, [r["ideal_model_speedup"] for r in rows], "k-.", lw=0.8, label="ideal whole model (MAC ratio)")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(xlabel="τ (larger runs fewer experts)", ylabel="speed-up over dense", title=f"{name} D2DMoE wall-clock")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
