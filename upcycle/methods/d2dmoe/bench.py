"""``upcycle bench d2dmoe``: D2DMoE (arXiv 2310.04361) against MoEfication (arXiv 2110.01786) at CPU scale.

Models:
    vit      the Fashion-MNIST ViT "S" of the MoE Jetpack benchmark (d 128, 4 blocks, FFN 512; cached pre-training),
             converted twice: FFNs only, and FFNs + attention projections (Q/K/V/O -> ReLU MLPs, §3.4)
    minilm   all-MiniLM-L6-v2 (real weights) with a 3-way head, fine-tuned densely to tell which text domain a
             64-token passage comes from (Shakespeare, Python code, Python docs), then converted

Each goes through the D2DMoE stages (ReLU + Hoyer sparsity, balanced k-means experts, routers fitted
with the backbone frozen) and a sweep: D2DMoE over τ, MoEfication over k, accuracy vs MACs as a fraction of the
original dense model (routers included). The operating point "within 1 point of the dense model" is chosen on the
validation split; its test accuracy is reported next to it. Wall-clock, for both models (the ViT's D2DMoE with FFNs
only; d 128 and 384): the FFN layers at several τ and at the operating point against the dense model's FFNs, and the
whole model end to end (images or passages per second), on one held-out test batch, each next to its ideal speed-up
(dense MACs / MoE MACs, routers included: of the FFNs, and of the whole model on that batch).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from ...provenance import write_results
from .recipe import TAUS


@dataclass(frozen=True)
class Scale:
    vit: tuple[str, dict]  # pre-training preset and architecture overrides
    vit_pretrain: dict
    vit_recipe: dict  # upcycle.methods.d2dmoe recipe (data, experts, stages, sweep)
    vit_attention: dict  # the attention stage of the second ViT run
    minilm_finetune: dict  # dense fine-tuning of MiniLM + head
    minilm_recipe: dict
    timing_taus: tuple[float, ...]  # the ViT's; each model's operating point is timed too
    minilm_timing_taus: tuple[float, ...] = (0.0, 0.01, 0.05, 0.2)  # MiniLM's operating points lie at smaller τ
    timing_repeats: int = 7
    mac_examples: int = 256


MINILM_TAUS = [0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0]
MIN_HELD_OUT = 1000  # examples per split behind every full-scale accuracy (one point is then 10 examples or fewer)
PRETRAIN = {"data": "fashion_mnist", "epochs": 3, "batch_size": 64, "lr": 1e-3, "label_smoothing": 0.1}  # shared
TEXT = {"data": "text_mixture", "seq_len": 64, "batch_size": 32}
FULL = Scale(
    vit=("vit_xs", {}),
    vit_pretrain=PRETRAIN,
    vit_recipe={
        "data": "fashion_mnist",
        "num_experts": 16,
        "router_hidden": 32,  # d/4: the paper's router-to-FFN cost ratio (ViT-B: 128 for d 768, h 3072) at d 128
        "taus": TAUS,
        "eval_examples": 5000,
        "sparsify": {"epochs": 1, "lr": 2e-4, "batch_size": 64, "aux": {"sparsity": 0.01}},
        "routers": {"epochs": 0.5, "lr": 1e-3, "batch_size": 64},
    },
    vit_attention={"steps": 400, "batch_size": 64},
    minilm_finetune={**TEXT, "steps": 150, "lr": 5e-5, "warmup": 0.1, "weight_decay": 0.01},
    minilm_recipe={
        "data": "text_mixture",
        "num_experts": 16,
        "router_hidden": 64,  # the same ratio at MiniLM's d 384
        "taus": MINILM_TAUS,
        "top_ks": [1, 2, 4, 8, 16],
        "eval_examples": 1536,  # of val's 3342 and test's 2982 passages
        "sparsify": {**TEXT, "steps": 150, "lr": 5e-5, "aux": {"sparsity": 0.003}},
        "routers": {**TEXT, "steps": 80, "lr": 1e-3},
    },
    timing_taus=(0.0, 0.1, 0.2, 0.4, 0.6),
)
QUICK = Scale(
    vit=("vit_xxs", {"embed_dim": 32, "depth": 2}),
    vit_pretrain={**PRETRAIN, "epochs": None, "steps": 40},
    vit_recipe={
        "data": "fashion_mnist",
        "num_experts": 4,
        "taus": [0.0, 0.3, 0.6, 1.0],
        "top_ks": [1, 2, 4],
        "eval_examples": 128,
        "sparsify": {"steps": 10, "eval_batches": 2, "aux": {"sparsity": 0.02}},
        "routers": {"steps": 10, "eval_batches": 2},
    },
    vit_attention={"steps": 5, "batch_size": 16},
    minilm_finetune={**TEXT, "batch_size": 8, "eval_batches": 1, "steps": 4, "lr": 5e-5},
    minilm_recipe={
        "data": "text_mixture",
        "num_experts": 4,
        "taus": [0.0, 0.5, 1.0],
        "top_ks": [1, 4],
        "eval_examples": 64,
        "sparsify": {**TEXT, "batch_size": 8, "eval_batches": 1, "steps": 4},
        "routers": {**TEXT, "batch_size": 8, "eval_batches": 1, "steps": 4},
    },
    timing_taus=(0.0, 0.5),
    minilm_timing_taus=(0.0, 0.5),
    timing_repeats=2,
    mac_examples=64,
)
DROP = 0.01  # "within 1 point of the dense model"
# What the paper reports for the headline numbers (arXiv 2310.04361: abstract and §1, "up to 60 %" lower inference
# cost without a significant loss; BERT "almost 60 %"), at its scale: ViT-B/16 on ImageNet-1k, BERT-base on
# CARER emotion. The authors' README gives no table. Printed next to ours in the results.
PAPER = {
    "vit.flops_fraction_at_1pt_drop": {"paper": 0.40, "setting": "ViT-B/16, ImageNet-1k, FFNs + attention projections",
                                       "claim": "up to ~60 % lower inference cost without a significant loss"},
    "minilm.flops_fraction_at_1pt_drop": {"paper": 0.40, "setting": "BERT-base, CARER emotion (we: MiniLM-L6, "
                                          "text domains)", "claim": "almost 60 % lower cost"},
    "vit.d2dmoe_at_or_above_moefication": {"paper": True, "setting": "every model of the paper",
                                           "claim": "better than MoEfication at every compute level"},
    "minilm.d2dmoe_at_or_above_moefication": {"paper": True, "setting": "every model of the paper",
                                              "claim": "better than MoEfication at every compute level"},
}  # fmt: skip


def beside_paper(summary: dict) -> dict:
    """Each headline number of ours next to the paper's: ``{key: {"ours", "paper", "setting", "claim"}}``."""
    return {key: {"ours": summary.get(key), **paper} for key, paper in PAPER.items()}


def vit_dense(scale: Scale, progress: bool) -> nn.Module:
    from ...export import load
    from ...pretrain import cached_pretrained

    arch, overrides = scale.vit
    return load(cached_pretrained(arch, scale.vit_pretrain, progress=progress, model=overrides)).eval()


def convert_and_sweep(dense: nn.Module, recipe: dict, out: Path, methods: list[str], scale: Scale,
                      progress: bool) -> tuple[dict, dict]:  # fmt: skip
    """Run the stages and the sweeps of ``methods``; returns (sweep results, converted models)."""
    from . import load_recipe, run_stages, sweep_methods

    recipe = load_recipe({**recipe, "methods": methods})
    models = run_stages(dense, recipe, out, progress=progress, redo=True)  # a changed scale rebuilds what it touches
    return sweep_methods(models, dense, recipe, out, mac_examples=scale.mac_examples), models


def operating_point(rows: list[dict], dense: dict) -> dict | None:
    """The cheapest sweep point whose validation accuracy is within 1 point of the dense model's (chosen on val)."""
    from .sweep import lowest_fraction_within

    return lowest_fraction_within(rows, dense["val"], "val", DROP)


def at_or_above(better: list[dict], baseline: list[dict], split: str = "test") -> bool:
    """``better``'s accuracy, interpolated along its cost curve, is ≥ ``baseline``'s at every baseline point inside
    ``better``'s cost range (each curve made monotone: the best accuracy at that cost or less)."""
    cost, accuracy = _pareto(better, split)
    for row in baseline:
        inside = cost[0] <= row["flops_fraction"] <= cost[-1]
        if inside and np.interp(row["flops_fraction"], cost, accuracy) < row[split] - 1e-9:
            return False
    return True


def _pareto(rows: list[dict], split: str) -> tuple[np.ndarray, np.ndarray]:
    ordered = sorted(rows, key=lambda row: row["flops_fraction"])
    cost = np.array([row["flops_fraction"] for row in ordered])
    return cost, np.maximum.accumulate(np.array([row[split] for row in ordered]))


def ffn_timing(dense: nn.Module, moe: nn.Module, data: str, taus: list[float], repeats: int) -> list[dict]:
    """FFN-layer and whole-model wall-clock of a D2DMoE model at several τ against its dense model, on the first
    test batch of ``data``; ``moe`` is left at τ = 0."""
    from ...eval import count_macs
    from ...eval.held_out import HeldOut
    from ...layers import set_tau
    from .sweep import ffn_wallclock_ms, first_batch, model_wallclock_ms

    batch = first_batch(HeldOut(dense, data, "test"))
    dense_report = count_macs(dense, batch)
    dense_ffn_macs = dense_report.breakdown["ffn"]
    rows = []
    for tau in taus:
        set_tau(moe, tau)
        report = count_macs(moe, batch)
        moe_ffn_macs = report.breakdown["experts"] + report.breakdown["routers"]
        dense_ffn_ms = ffn_wallclock_ms(dense, batch, repeats)  # re-measured next to each MoE measurement
        moe_ffn_ms = ffn_wallclock_ms(moe, batch, repeats)
        rows.append({
            "tau": tau,
            "ffn_flops_fraction": moe_ffn_macs / dense_ffn_macs,
            "ideal_ffn_speedup": dense_ffn_macs / moe_ffn_macs,
            "ideal_model_speedup": dense_report.total / report.total,
            "dense_ffn_ms": dense_ffn_ms, "moe_ffn_ms": moe_ffn_ms, "ffn_speedup": dense_ffn_ms / moe_ffn_ms,
            "dense_model_ms": model_wallclock_ms(dense, batch, repeats),
            "moe_model_ms": model_wallclock_ms(moe, batch, repeats),
        })  # fmt: skip
        rows[-1]["model_speedup"] = rows[-1]["dense_model_ms"] / rows[-1]["moe_model_ms"]
        rows[-1]["share_of_ideal"] = rows[-1]["ffn_speedup"] / rows[-1]["ideal_ffn_speedup"]
        rows[-1]["model_share_of_ideal"] = rows[-1]["model_speedup"] / rows[-1]["ideal_model_speedup"]
    set_tau(moe, 0.0)
    return rows


def timing_with_operating_point(dense: nn.Module, moe: nn.Module, sweeps: dict, data: str, taus: tuple[float, ...],
                                repeats: int) -> list[dict]:  # fmt: skip
    """:func:`ffn_timing` at ``taus`` and at the D2DMoE operating point of ``sweeps`` (a convert-and-sweep result)."""
    point = operating_point(sweeps["d2dmoe"], sweeps["dense"])
    return ffn_timing(dense, moe, data, sorted({*taus, *([point["point"]] if point else [])}), repeats)


def _timing_at(timing: list[dict], tau: float) -> dict | None:
    return next((row for row in timing if abs(row["tau"] - tau) < 1e-9), None)


def summarize(curves: dict[str, dict], timing: dict[str, list[dict]]) -> dict:
    summary: dict = {}
    for name, curve in curves.items():
        summary[f"{name}.dense_val"], summary[f"{name}.dense_test"] = curve["dense"]["val"], curve["dense"]["test"]
        summary[f"{name}.relu_sparse_test"] = curve["sparse"]["test"]
        for variant, rows in curve["variants"].items():
            point = operating_point(rows, curve["dense"])
            key = f"{name}.{variant}"
            summary[f"{key}.flops_fraction_at_1pt_drop"] = None if point is None else round(point["flops_fraction"], 4)
            summary[f"{key}.point_at_1pt_drop"] = None if point is None else point["point"]
            summary[f"{key}.test_at_1pt_drop"] = None if point is None else point["test"]
        if "d2dmoe" in curve["variants"] and "moefication" in curve["variants"]:
            summary[f"{name}.d2dmoe_at_or_above_moefication"] = at_or_above(
                curve["variants"]["d2dmoe"], curve["variants"]["moefication"]
            )
    # the headline keys. ViT: the cheaper D2DMoE variant (both operating points are chosen on validation)
    variants = [v for v in ("d2dmoe", "d2dmoe_attention") if summary.get(f"vit.{v}.flops_fraction_at_1pt_drop")]
    best = min(variants, key=lambda v: summary[f"vit.{v}.flops_fraction_at_1pt_drop"], default=None)
    summary["vit.best_d2dmoe_variant"] = best
    summary["vit.flops_fraction_at_1pt_drop"] = (
        None if best is None else summary[f"vit.{best}.flops_fraction_at_1pt_drop"]
    )
    summary["vit.moefication_flops_fraction_at_1pt_drop"] = summary.get("vit.moefication.flops_fraction_at_1pt_drop")
    summary["minilm.flops_fraction_at_1pt_drop"] = summary.get("minilm.d2dmoe.flops_fraction_at_1pt_drop")
    for name, rows in timing.items():  # wall-clock at each model's D2DMoE operating point (chosen on validation)
        point = operating_point(curves[name]["variants"]["d2dmoe"], curves[name]["dense"])
        at = None if point is None else _timing_at(rows, point["point"])
        for key, field in (("ffn_wallclock_speedup", "ffn_speedup"), ("ffn_ideal_speedup", "ideal_ffn_speedup"),
                           ("ffn_share_of_ideal", "share_of_ideal"), ("model_speedup", "model_speedup"),
                           ("model_ideal_speedup", "ideal_model_speedup"),
                           ("model_share_of_ideal", "model_share_of_ideal")):  # fmt: skip
            summary[f"{name}.{key}_at_1pt_drop"] = None if at is None else round(at[field], 3)
        summary[f"{name}.ffn_speedup_by_tau"] = {str(r["tau"]): round(r["ffn_speedup"], 3) for r in rows}
    return summary


def run(out: str | os.PathLike = "results", quick: bool = False, progress: bool = True) -> dict:
    """Run the benchmark; stage models are cached under ``$UPCYCLE_CACHE/bench/d2dmoe-{full,quick}`` (resumable)."""
    from ...pretrain import finetuned_minilm
    from ...sources import cache_root
    from .plots import plot_curves, plot_timing

    scale = QUICK if quick else FULL
    work = cache_root() / "bench" / f"d2dmoe-{'quick' if quick else 'full'}"
    seconds: dict[str, float] = {}
    began = time.perf_counter()
    dense = vit_dense(scale, progress)
    seconds["vit_pretrain"] = time.perf_counter() - began

    began = time.perf_counter()
    ffn_results, ffn_models = convert_and_sweep(dense, scale.vit_recipe, work / "vit", ["d2dmoe", "moefication"],
                                                scale, progress)  # fmt: skip
    attention_recipe = {**scale.vit_recipe, "attention": scale.vit_attention}
    attention_results, _ = convert_and_sweep(dense, attention_recipe, work / "vit-attention", ["d2dmoe"], scale,
                                             progress)  # fmt: skip
    vit = {"dense": ffn_results["dense"], "sparse": ffn_results["sparse"], "variants": {
        "d2dmoe": ffn_results["d2dmoe"], "moefication": ffn_results["moefication"],
        "d2dmoe_attention": attention_results["d2dmoe"],
    }}  # fmt: skip
    seconds["vit"] = time.perf_counter() - began

    began = time.perf_counter()
    timing = {"vit": timing_with_operating_point(dense, ffn_models["d2dmoe"], ffn_results, scale.vit_recipe["data"],
                                                 scale.timing_taus, scale.timing_repeats)}  # fmt: skip
    seconds["timing"] = time.perf_counter() - began

    began = time.perf_counter()
    minilm = finetuned_minilm(scale.minilm_finetune, work / "minilm-dense", progress=progress)
    minilm_results, minilm_models = convert_and_sweep(minilm, scale.minilm_recipe, work / "minilm",
                                                      ["d2dmoe", "moefication"], scale, progress)  # fmt: skip
    seconds["minilm"] = time.perf_counter() - began
    began = time.perf_counter()
    timing["minilm"] = timing_with_operating_point(minilm, minilm_models["d2dmoe"], minilm_results,
                                                   scale.minilm_recipe["data"], scale.minilm_timing_taus,
                                                   scale.timing_repeats)  # fmt: skip
    seconds["timing"] += time.perf_counter() - began
    curves = {
        "vit": vit,
        "minilm": {"dense": minilm_results["dense"], "sparse": minilm_results["sparse"],
                   "variants": {m: minilm_results[m] for m in ("d2dmoe", "moefication")}},
    }  # fmt: skip

    summary = summarize(curves, timing)
    summary["paper"] = beside_paper(summary)
    summary["held_out_examples"] = {
        "vit": scale.vit_recipe["eval_examples"],
        "minilm": scale.minilm_recipe["eval_examples"],
    }  # per split and sweep point
    summary["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    curves_png, timing_png = out / "d2dmoe_curves.png", out / "d2dmoe_wallclock.png"
    plot_curves(curves, curves_png)
    plot_timing(timing, timing_png)
    rows = [{"model": name, "variant": variant, **row} for name, curve in curves.items()
            for variant, variant_rows in curve["variants"].items() for row in variant_rows]  # fmt: skip
    rows += [{"model": name, "variant": "d2dmoe_timing", **row} for name, runs in timing.items() for row in runs]
    references = {name: {"dense": c["dense"], "relu_sparse": c["sparse"]} for name, c in curves.items()}
    references["vit"]["relu_sparse_with_attention_mlps"] = attention_results["sparse"]
    path = write_results(
        out, "d2dmoe", summary, rows, quick=quick, references=references,
        scale={k: v for k, v in scale.__dict__.items()},
        stage_reports=_stage_reports(work),
        reproduce="make install data && .venv/bin/upcycle bench d2dmoe" + (" --quick" if quick else ""),
    )  # fmt: skip
    return {"summary": summary, "json": str(path), "png": f"{curves_png}, {timing_png}"}


def _stage_reports(work: Path) -> dict:
    """Activation sparsity per layer and the distillation errors the stages wrote."""
    reports = {}
    for path in sorted(work.glob("*/*/*.json")):
        if path.name in ("activation_sparsity.json", "distillation.json"):
            reports[f"{path.parent.parent.name}/{path.parent.name}/{path.name}"] = json.loads(path.read_text())
    return reports
