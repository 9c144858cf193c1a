"""``upcycle bench bam``: BAM (arXiv 2408.08274) against BTX (arXiv 2403.07816) and the dense seed, at CPU scale.

The seed is upcycle's own byte-level LM with parallel blocks (BAM's layout: attention and FFN read one normalised
input), pre-trained on the natural mixture of the three text domains (Shakespeare, Python code, Python docs) and
cached. Each run (one per seed) then goes through the BAM pipeline: three domain branches (each 90% its domain,
10% the others), then, on the same mixture-phase data (the domains in equal shares), BTX, BAM with expert KV and
BAM with shared KV, all top-1 with the raw router probability, plus the seed continued densely with the compute of
BAM expert-KV (branch phase included). Reported: held-out test perplexity per domain (whole files never trained on)
and its average, parameters total / active, MACs per token and CPU latency. The seed changes the branches' and
mixtures' data order and router initialisation; the pre-trained seed model is shared.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ...provenance import write_results

MODELS = ("seed", "dense_continued", "btx", "bam_expert_kv", "bam_shared_kv", "dense_mix_compute")
PER_DOMAIN = ("val", "test", "expert_usage")  # evaluation entries with one value per domain (not costs)
PAPER = {"btx_ppl": 10.72, "bam_expert_kv_ppl": 9.70, "bam_over_btx": 0.905, "seed_size": "590M"}


@dataclass(frozen=True)
class Scale:
    model: dict  # lm_tiny_parallel overrides
    pretrain: dict  # the seed's pre-training on the natural mixture
    recipe: dict  # upcycle.methods.bam recipe (branch, mix, evaluation)
    seeds: tuple[int, ...]


TRAIN = {"batch_size": 16, "seq_len": 128, "weight_decay": 0.1, "warmup": 0.05, "log_every": 20}
FULL = Scale(
    model={
        "hidden_size": 128,
        "intermediate_size": 344,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    pretrain={**TRAIN, "data": "text_mixture", "steps": 1500, "lr": 2e-3, "eval_every": 500, "eval_batches": 20},
    recipe={
        "branch": {**TRAIN, "steps": 600, "lr": 1e-3, "eval_batches": 20},
        "mix": {**TRAIN, "steps": 500, "lr": 5e-4, "eval_every": 100, "eval_batches": 20},
        "eval_sequences": 256,
    },
    seeds=(0, 1),
)
QUICK_TRAIN = {**TRAIN, "batch_size": 8, "seq_len": 64, "log_every": 2, "eval_batches": 2}
QUICK = Scale(
    model={
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    pretrain={**QUICK_TRAIN, "data": "text_mixture", "steps": 20, "lr": 2e-3},
    recipe={"branch": {**QUICK_TRAIN, "steps": 6}, "mix": {**QUICK_TRAIN, "steps": 6}, "eval_sequences": 16},
    seeds=(0,),
)


def seed_model(scale: Scale, progress: bool) -> nn.Module:
    from ...export import load
    from ...pretrain import cached_pretrained

    return load(cached_pretrained("lm_tiny_parallel", scale.pretrain, progress, model=scale.model)).eval()


def summarize(runs: dict[int, dict]) -> dict:
    """Mean headline perplexities over the runs, each run's own, the paper's ordering, and the first run's costs."""
    per_run = {seed: {f"{m}_ppl": run[f"{m}_ppl"] for m in MODELS} for seed, run in runs.items()}
    for row in per_run.values():
        row["bam_over_btx"] = row["bam_expert_kv_ppl"] / row["btx_ppl"]
    summary = {f"{m}_ppl": statistics.fmean(r[f"{m}_ppl"] for r in per_run.values()) for m in MODELS}
    summary["bam_over_btx"] = summary["bam_expert_kv_ppl"] / summary["btx_ppl"]
    summary["ordering_holds"] = summary["bam_expert_kv_ppl"] < summary["btx_ppl"] < summary["dense_continued_ppl"]
    summary["ordering_holds_every_run"] = all(
        r["bam_expert_kv_ppl"] < r["btx_ppl"] < r["dense_continued_ppl"] for r in per_run.values()
    )
    summary["ratio_target_met"] = summary["bam_over_btx"] <= 0.95
    summary["per_run"] = {str(seed): row for seed, row in per_run.items()}
    first = runs[min(runs)]
    summary["costs"] = {name: {k: v for k, v in first["models"][name].items() if k not in PER_DOMAIN}
                        for name in MODELS}  # fmt: skip
    summary["paper"] = PAPER
    return summary


def run(out: str | os.PathLike = "results", quick: bool = False, progress: bool = True) -> dict:
    """Run the benchmark; phases are cached under ``$UPCYCLE_CACHE/bench/bam-{full,quick}`` (resumable)."""
    from ...sources import cache_root
    from . import run_bam
    from .plots import plot_bam, plot_usage

    scale = QUICK if quick else FULL
    work = cache_root() / "bench" / f"bam-{'quick' if quick else 'full'}"
    seconds: dict[str, float] = {}
    began = time.perf_counter()
    seed = seed_model(scale, progress)
    seconds["seed_pretrain"] = time.perf_counter() - began
    runs = {}
    for run_seed in scale.seeds:
        began = time.perf_counter()
        runs[run_seed] = run_bam(seed, {**scale.recipe, "seed": run_seed}, work / f"seed-{run_seed}", progress)
        seconds[f"run_seed_{run_seed}"] = time.perf_counter() - began

    summary = summarize(runs)
    summary["dense_continued_compute"] = json.loads(
        (work / f"seed-{min(runs)}/dense-continued/compute.json").read_text()
    )
    summary["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png, usage_png = out / "bam.png", out / "bam_routing.png"
    first = runs[min(runs)]
    domains = first["recipe"]["domains"]
    plot_bam({f"seed {s}": run["models"] for s, run in runs.items()}, domains, png)
    plot_usage(first["models"], domains, usage_png)
    usage = {name: row["expert_usage"] for name, row in first["models"].items() if "expert_usage" in row}
    rows = [{"seed": s, "model": name, "split": split, **values}
            for s, run in runs.items() for name, row in run["models"].items()
            for split, values in row.items() if split in ("val", "test")]  # fmt: skip
    path = write_results(
        out, "bam", summary, rows, quick=quick, scale=scale.__dict__, recipe=first["recipe"],
        expert_usage={"seed": min(runs), "validation": usage},
        reproduce="make install data && .venv/bin/upcycle bench bam" + (" --quick" if quick else ""),
    )  # fmt: skip
    return {"summary": summary, "json": str(path), "png": f"{png}, {usage_png}"}
