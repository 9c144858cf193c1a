"""``upcycle bench layers``: training-step and inference time of MoE layers against the dense FFN they replace.

Side by side in one process, interleaved round by round (see ``time_interleaved``), at two shapes:
ViT-like (batch 128 × 65 tokens, d 192, h 768) and LM-like (4 × 128 tokens, d 576, h 1536). Layers:
  dense            FFN d -> h -> d (GELU)
  top2_e8          top-2 of 8 experts, hidden h/2 each: active expert FLOPs = dense FLOPs
  top8_e64         fine-grained top-8 of 64 experts, hidden h/8 each: same active FLOPs
  soft_e8          Soft MoE, 8 full-width experts, about one slot per token in total: same expert FLOPs
Top-k layers run on the ``grouped`` and on the ``eager`` backend with the same weights. A training step is
forward + backward of ``sum(y · g)`` for a fixed random g (no optimizer); inference runs under ``inference_mode``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..eval.timing import median_ms, time_interleaved
from ..layers import FFN, Experts, MoE, SoftMoERouter, TopKRouter
from ..provenance import write_results

SHAPES = {
    "vit": {"batch": 128, "tokens": 65, "d": 192, "h": 768},
    "lm": {"batch": 4, "tokens": 128, "d": 576, "h": 1536},
}
QUICK_BATCH = {"vit": 8, "lm": 1}
TARGETS = {"grouped_over_dense_train": ("<=", 1.3), "grouped_speedup_over_eager_train_e64": (">=", 3.0)}


def build_layers(d: int, h: int, tokens: int) -> dict[str, tuple[nn.Module, int]]:
    """name -> (layer, multiply-accumulates per token: experts, routers and slot mixing included)."""
    slots = max(1, round(tokens / 8))
    total_slots = 8 * slots
    soft_macs = (total_slots * 2 * d * h + 3 * tokens * total_slots * d) / tokens  # experts + logits/dispatch/combine
    router_std = d**-0.5  # logits of unit variance: a realistic, roughly balanced routing of random inputs
    return {
        "dense": (FFN(d, h), 2 * d * h),
        "top2_e8": (MoE(TopKRouter(d, 8, top_k=2, init_std=router_std), Experts(8, d, h // 2)), d * 8 + 2 * d * h),
        "top8_e64": (MoE(TopKRouter(d, 64, top_k=8, init_std=router_std), Experts(64, d, h // 8)), d * 64 + 2 * d * h),
        f"soft_e8_s{slots}": (MoE(SoftMoERouter(d, 8, slots_per_expert=slots), Experts(8, d, h)), round(soft_macs)),
    }


def _cases(layers: dict, x: torch.Tensor, upstream: torch.Tensor) -> dict[str, tuple]:
    """(name, layer, backend) for each timed configuration."""
    cases = {}
    for name, (layer, _) in layers.items():
        backends = ["grouped", "eager"] if isinstance(layer, MoE) and layer.router.kind == "sparse" else [None]
        for backend in backends:
            cases[name if backend is None else f"{name}/{backend}"] = (layer, backend)
    return cases


def bench_shape(shape: str, quick: bool, rounds: int) -> list[dict]:
    spec = dict(SHAPES[shape])
    if quick:
        spec["batch"] = QUICK_BATCH[shape]
    b, n, d, h = spec["batch"], spec["tokens"], spec["d"], spec["h"]
    torch.manual_seed(0)
    layers = build_layers(d, h, n)
    x = torch.randn(b, n, d)
    upstream = torch.randn(b, n, d)
    cases = _cases(layers, x, upstream)
    train_input = {}

    def setup(case: str) -> None:
        layer, backend = cases[case]
        layer.zero_grad(set_to_none=True)
        if backend is not None:
            layer.experts.backend = backend
        train_input[case] = x.clone().requires_grad_(True)

    def train_step(case: str):
        def run() -> None:
            layer, _ = cases[case]
            (layer(train_input[case]) * upstream).sum().backward()

        return run

    def infer_step(case: str):
        def run() -> None:
            layer, _ = cases[case]
            with torch.inference_mode():
                layer(x)

        return run

    train = time_interleaved({c: train_step(c) for c in cases}, rounds, setup=setup, desc=f"{shape} train")
    infer = time_interleaved({c: infer_step(c) for c in cases}, rounds, setup=setup, desc=f"{shape} infer")
    rows = []
    for case, (layer, backend) in cases.items():
        name = case.split("/")[0]
        rows.append(
            {
                "shape": shape,
                "layer": name,
                "backend": backend or "-",
                **spec,
                "train_ms": round(median_ms(train[case]), 3),
                "infer_ms": round(median_ms(infer[case]), 3),
                "train_ms_samples": [round(1000 * s, 3) for s in train[case]],
                "infer_ms_samples": [round(1000 * s, 3) for s in infer[case]],
                "macs_per_token": layers[name][1],
                "params": sum(p.numel() for p in layer.parameters()),
            }
        )
    return rows


def _row(rows: list[dict], shape: str, layer: str, backend: str = "-") -> dict:
    return next(r for r in rows if r["shape"] == shape and r["layer"] == layer and r["backend"] == backend)


def summarize(rows: list[dict]) -> dict:
    summary = {}
    for shape in SHAPES:
        prefix = "" if shape == "vit" else f"{shape}_"
        dense = _row(rows, shape, "dense")
        soft = next(r for r in rows if r["shape"] == shape and r["layer"].startswith("soft"))
        for mode in ("train", "infer"):
            key = f"{mode}_ms"
            summary[f"{prefix}grouped_over_dense_{mode}"] = _row(rows, shape, "top2_e8", "grouped")[key] / dense[key]
            summary[f"{prefix}soft_over_dense_{mode}"] = soft[key] / dense[key]
            for layer, tag in (("top2_e8", "e8"), ("top8_e64", "e64")):
                eager, grouped = _row(rows, shape, layer, "eager")[key], _row(rows, shape, layer, "grouped")[key]
                summary[f"{prefix}grouped_speedup_over_eager_{mode}_{tag}"] = eager / grouped
            summary[f"{prefix}grouped_e64_over_dense_{mode}"] = (
                _row(rows, shape, "top8_e64", "grouped")[key] / dense[key]
            )
    summary = {key: round(value, 3) for key, value in summary.items()}
    for key, (op, target) in TARGETS.items():
        met = summary[key] <= target if op == "<=" else summary[key] >= target
        summary[f"{key}_target"] = f"{op} {target}"
        summary[f"{key}_met"] = bool(met)
    return summary


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SHAPES), figsize=(6.5 * len(SHAPES), 4.2))
    for ax, shape in zip(axes, SHAPES, strict=True):
        shape_rows = [r for r in rows if r["shape"] == shape]
        labels = [r["layer"] + ("" if r["backend"] == "-" else f" ({r['backend']})") for r in shape_rows]
        dense = _row(rows, shape, "dense")
        positions = range(len(shape_rows))
        for offset, mode, color in ((-0.2, "train", "tab:blue"), (0.2, "infer", "tab:orange")):
            values = [r[f"{mode}_ms"] for r in shape_rows]
            bars = ax.barh([p + offset for p in positions], values, height=0.38, color=color, label=mode)
            for bar, value in zip(bars, values, strict=True):
                ratio = value / dense[f"{mode}_ms"]
                ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {ratio:.2f}×", va="center", fontsize=7)
        ax.set_yticks(list(positions), labels, fontsize=8)
        ax.invert_yaxis()
        spec = shape_rows[0]
        ax.set_title(f"{shape}: {spec['batch']}×{spec['tokens']} tokens, d {spec['d']}, h {spec['h']}", fontsize=9)
        ax.set_xlabel("milliseconds per step (× = relative to dense)")
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("MoE layers vs the dense FFN at equal active FLOPs (CPU)", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


def run(out: str | os.PathLike = "results", quick: bool = False, rounds: int | None = None) -> dict:
    rounds = rounds or (3 if quick else 7)
    rows = []
    for shape in SHAPES:
        rows.extend(bench_shape(shape, quick, rounds))
    summary = summarize(rows)
    out = Path(out)
    path = write_results(
        out,
        "layers",
        summary,
        rows,
        quick=quick,
        rounds=rounds,
        reproduce="make install && .venv/bin/upcycle bench layers" + (" --quick" if quick else ""),
    )
    plot(rows, out / "layers.png")
    return {"summary": summary, "json": str(path), "png": str(out / "layers.png")}
