"""``upcycle bench upcycling``: the dense → MoE upcycling methods side by side on one dense LM, one training recipe.

Every column is a ``upcycle.convert`` config on the same dense SmolLM2-135M (every FFN converted), then the same
``upcycle.train`` run on the ``text_mixture`` domains in equal shares: same steps, tokens, batches in the same
order, learning-rate schedule, aux-loss coefficients and seed.

    dense_continued             no conversion: the dense model trained on
    sparse_upcycling            4 copies × granularity 2 = 8 half-width experts, top-2 of tied groups: one whole copy
                                per token (arXiv 2212.05055, 2410.07524); starts exactly as the dense model
    sparse_upcycling_top1       4 whole copies, top-1 (Drop-Upcycling at r = 0); starts exactly as the dense model
    drop_upcycling_r0.25 / 0.5  4 copies, a share r of each copy's units redrawn, top-1 (arXiv 2502.19261)
    shared_finegrained          a quarter of the units always on + 2 copies × 4 segments, top-4 = one whole copy
                                (DeepSeekMoE arXiv 2401.06066, as Qwen1.5-MoE upcycles); starts exactly as dense
    drop_upcycling_r0.5_data_router
                                drop_upcycling_r0.5 with its router rows from data (cluster centroids of the FFN
                                inputs on calibration text) instead of a random draw
    cmoe                        the method's defaults (arXiv 2502.04416): 2 shared + 2 of 14 routed experts of 1/16
                                of the units each (~25% of the FFN active), analytic router from activation statistics
    moefication                 16 experts of k-means-grouped units, top-4 (~25% active) under an MLP router
                                (arXiv 2110.01786) that takes no gradient from the LM loss: the column runs the
                                router-fitting stage of the D2DMoE / MoEfication pipeline instead, backbone frozen,
                                with the same steps, tokens and schedule (lr 1e-3, the routers' own rate). The
                                pipeline's sparsification stage (ReLU-fication of a SiLU FFN) is left out.

The first six MoE columns and the dense one cost the same MACs per token (their active FFN is the dense FFN; the
routers add < 1%); cmoe and moefication run a quarter of it. Measured per column: held-out perplexity per domain
(a curve on the validation split from step 0, before any update, every ``eval_every`` steps; the test split at
step 0 and at the end), MACs per token, parameters, training wall time (without the curve's evaluations) and the
routers' expert-load statistics on the validation text. Nothing is chosen on the test split. The papers' numbers
are in :data:`PAPER` beside ours where they are comparable, with the reason where not.

Each finished column is appended to a JSON-lines progress file under the cache, keyed by a digest of everything
that shapes it, so an interrupted benchmark resumes with the columns still missing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..provenance import write_results

DOMAINS = ("shakespeare", "python_code", "python_docs")
CALIBRATION = "shakespeare"  # router-from-data and CMoE calibration text (train split): the methods' default domain
# name -> the convert config (None: the dense model); every FFN, the recipe's seed (column_config)
COLUMNS: dict[str, dict | None] = {
    "dense_continued": None,
    "sparse_upcycling": {"method": "sparse_upcycling", "num_experts": 4, "top_k": 2, "options": {"granularity": 2}},
    "sparse_upcycling_top1": {"method": "sparse_upcycling", "num_experts": 4, "top_k": 1},
    "drop_upcycling_r0.25": {"method": "drop_upcycling", "num_experts": 4, "top_k": 1, "options": {"drop_ratio": 0.25}},
    "drop_upcycling_r0.5": {"method": "drop_upcycling", "num_experts": 4, "top_k": 1, "options": {"drop_ratio": 0.5}},
    "shared_finegrained": {"method": "shared_finegrained", "num_experts": 8, "top_k": 4,
                           "options": {"segments": 4, "shared_fraction": 0.25}},
    "drop_upcycling_r0.5_data_router": {"method": "drop_upcycling", "num_experts": 4, "top_k": 1,
                                        "options": {"drop_ratio": 0.5},
                                        "router": {"init": "data", "init_data": CALIBRATION}},
    "cmoe": {"method": "cmoe", "num_experts": 14, "top_k": 2, "router": {"type": "cmoe"},
             "options": {"shared_experts": 2, "calibration_data": CALIBRATION}},
    "moefication": {"method": "moefication", "num_experts": 16, "top_k": 4},
}  # fmt: skip
EQUAL_FLOPS = ("dense_continued", "sparse_upcycling", "sparse_upcycling_top1", "drop_upcycling_r0.25",
               "drop_upcycling_r0.5", "shared_finegrained", "drop_upcycling_r0.5_data_router")  # fmt: skip
# MoEfication's router learns only from its fit loss (BCE on its experts' activation sums), with the backbone frozen
ROUTER_STAGE = {"freeze": "all_but_routers", "lr": 1e-3, "aux": {"router_fit": 1.0, "load_balancing": 0.0,
                                                                   "z_loss": 0.0}}  # fmt: skip
TRAIN_OVERRIDES = {"moefication": ROUTER_STAGE}
NOTES = {  # what a reader of the results needs to know about a column, written beside its numbers
    "sparse_upcycling": "exact start (tied router rows per copy, renormalised top-2 = one whole copy)",
    "sparse_upcycling_top1": "exact start (four whole copies, top-1 with weight 1); the control that tells the "
    "granular column's router ties from upcycling itself, and Drop-Upcycling's r = 0",
    "shared_finegrained": "exact start (one whole copy of the routed segments per token, shared expert ungated)",
    "cmoe": "a quarter of each FFN active: cheaper than the dense model, not an equal-FLOPs column; test_step0 is "
    "the carved model without training",
    "moefication": "a quarter of each FFN active; trained with its router-fitting stage (backbone frozen, routers "
    "fit by BCE to their experts' activation sums, lr 1e-3) for the same steps and tokens, as its router takes no "
    "gradient from the LM loss; the pipeline's sparsification stage is left out, so SmolLM2's SiLU FFN is split as "
    "it is",
    "drop_upcycling_r0.5_data_router": f"router rows: spherical k-means centroids of each FFN's inputs on "
    f"{CALIBRATION} (train split)",
}

PAPER = {
    "drop_upcycling": {
        "source": "Nakamura et al., Drop-Upcycling, ICLR 2025, arXiv 2502.19261 (abstract, Fig. 3)",
        "claims": "r = 0.5 best of the ratios tried; sparse (naive) upcycling leads early, Drop-Upcycling overtakes "
        "it when training on hundreds of billions of tokens; an 8×3.7B MoE (5.9B active) matches a 13B dense "
        "model at ~1/4 of the training FLOPs",
        "comparable": "not comparable: their gains over sparse upcycling appear after >100B tokens of training at "
        "8 experts top-2; this benchmark trains for well under a million tokens, where the paper itself shows sparse "
        "upcycling ahead. Compare the curves' early ordering, not the final gap",
    },
    "cmoe": {
        "source": "Pei et al., CMoE, arXiv 2502.04416 (abstract)",
        "claims": "without training: lossless perplexity at 75% activation; 'usable perplexity' at 25% activation "
        "(S2A2E16, 1.5x end-to-end speed-up); a brief LoRA fine-tune (2,000 samples) recovers over 76% of the dense "
        "model's downstream accuracy",
        "comparable": "in kind only: ours is the same S2A2E16 carving (25% active) of a 135M model on our own "
        "domains, full fine-tuning rather than LoRA; see summary.cmoe_step0_over_dense (perplexity at step 0 over "
        "the dense model's)",
    },
    "sparse_upcycling": {
        "source": "Komatsuzaki et al., arXiv 2212.05055",
        "comparable": "not comparable: T5 / ViT, 32 experts, expert choice in the encoder, ~1M extra steps",
    },
    "shared_finegrained": {"comparable": "not comparable: Qwen1.5-MoE publishes no upcycling ablation to match"},
    "moefication": {
        "source": "Zhang et al., arXiv 2110.01786",
        "comparable": "not comparable: ReLU T5 / BERT models (SmolLM2's SiLU FFN is not sparse without the "
        "sparsification stage left out here)",
    },
}


@dataclass(frozen=True)
class Scale:
    source: str  # "smollm2" or a pre-training preset built at random init (quick)
    model: dict  # the preset's architecture overrides
    train: dict  # the one recipe every column trains with
    curve_sequences: int  # validation sequences per domain at every point of the curve
    test_sequences: int  # test sequences per domain at step 0 and at the end
    domains: tuple[str, ...] = DOMAINS
    calibration_examples: int = 64  # CMoE and router-from-data calibration blocks (train split)


# SmolLM2-135M at 4 × 128 tokens a step in bf16 autocast; lr, warm-up and decay chosen before any run, not tuned (a
# pre-trained 135M LM moves with small steps: BAM's mix phase used 5e-5, new routers get twice that). How 150 steps
# (77k tokens per column) was chosen for ~75 min on 2 cores: the dense model trains at ~240 tokens/s (2.1 s a step),
# the five equal-FLOPs MoEs at an estimated 1.3-1.6x that (4x the FFN optimizer state, expert dispatch), CMoE at about
# the dense rate and MoEfication's router stage (no weight gradients) below it: ~53 min of training; each column's
# held-out evaluation (6 curve points × 2 domains × 24 sequences, 2 × 48 test sequences at step 0 and at the end, the
# load statistics) ~100 s, ~13 min in all; loading, conversion and calibration ~5 min.
SMOL_TRAIN = {"data": "text_mixture", "steps": 150, "batch_size": 4, "seq_len": 128, "lr": 1e-4, "warmup": 0.05,
              "weight_decay": 0.1, "precision": "bf16", "eval_every": 30, "eval_batches": 2, "log_every": 10,
              "checkpoints": False, "seed": 0}  # fmt: skip
FULL = Scale(
    source="smollm2",
    model={},
    train=SMOL_TRAIN,
    curve_sequences=24,
    test_sequences=48,
    domains=("shakespeare", "python_code"),
)
TINY_LM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2}  # fmt: skip
QUICK_TRAIN = {**SMOL_TRAIN, "steps": 4, "seq_len": 32, "lr": 1e-3, "warmup": 0.25, "precision": "fp32",
               "eval_every": 2, "eval_batches": 1, "log_every": 2}  # fmt: skip
QUICK = Scale(
    source="lm_tiny",
    model=TINY_LM,
    train=QUICK_TRAIN,
    curve_sequences=4,
    test_sequences=4,
    domains=("shakespeare", "python_code"),
    calibration_examples=4,
)


def dense_model(scale: Scale) -> nn.Module:
    """The dense model every column starts from (SmolLM2-135M, or a tiny byte-level LM at random init)."""
    if scale.source == "smollm2":
        from ..assets import smollm2_dir
        from ..sources import load_source

        return load_source(str(smollm2_dir())).eval()
    from ..pretrain import build_dense

    return build_dense(scale.source, seed=0, **scale.model).eval()


def column_config(column: str, scale: Scale) -> dict | None:
    """The column's convert config at this scale (calibration sizes follow the scale)."""
    config = copy.deepcopy(COLUMNS[column])
    if config is None:
        return None
    config.update(layers="all", seed=scale.train["seed"])
    if config["method"] == "cmoe":
        config["options"].update(calibration_examples=scale.calibration_examples,
                                 calibration_seq_len=scale.train["seq_len"])  # fmt: skip
    if config.get("router", {}).get("init") == "data":
        config["router"]["init_examples"] = scale.calibration_examples
    return config


def train_config(column: str, scale: Scale) -> dict:
    overrides = TRAIN_OVERRIDES.get(column, {})
    aux = {**scale.train.get("aux", {}), **overrides.get("aux", {})}
    config = {**scale.train, **overrides, "data_options": {"weights": dict.fromkeys(DOMAINS, 1.0)}}
    return {**config, "aux": aux} if aux else config


def run_column(column: str, dense: nn.Module, scale: Scale, held_out: dict, workdir: Path) -> dict:
    """Convert, measure at step 0, train with the per-domain curve, measure again: one row of the results."""
    from ..convert import convert
    from ..record import copy_model
    from ..train import train
    from .upcycling_eval import costs, load_statistics

    began = time.perf_counter()
    config = column_config(column, scale)
    model = copy_model(dense) if config is None else convert(dense, config=config, progress=False)  # with its record
    convert_seconds = time.perf_counter() - began
    bf16 = scale.train["precision"] == "bf16"
    curve: list[dict] = []
    test_step0: dict = {}
    spent = [0.0]  # seconds inside the curve's evaluations, taken out of the training time

    def on_eval(model: nn.Module, step: int) -> None:
        start = time.perf_counter()
        curve.append({"step": step, **held_out["val"].perplexity(model)})
        if step == 0:
            test_step0.update(held_out["test"].perplexity(model))
        spent[0] += time.perf_counter() - start

    cost = costs(model, held_out["val"].example_ids(2))  # before training: routing at the start
    began = time.perf_counter()
    train(model, train_config(column, scale), workdir, progress=False, on_eval=on_eval)
    train_seconds = time.perf_counter() - began - spent[0]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        test = held_out["test"].perplexity(model)
    steps, tokens = scale.train["steps"], scale.train["steps"] * scale.train["batch_size"] * scale.train["seq_len"]
    return {
        "column": column,
        "convert": config,
        "train_overrides": TRAIN_OVERRIDES.get(column, {}),
        "steps": steps,
        "tokens": tokens,
        "test_step0": test_step0,
        "test": test,
        "val_curve": curve,
        **cost,
        "macs_per_token_trained": costs(model, held_out["val"].example_ids(2))["macs_per_token"],
        "load": load_statistics(model, held_out["val"], bf16),
        "convert_seconds": round(convert_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "tokens_per_second": round(tokens / max(train_seconds, 1e-9), 1),
    }


def summarize(rows: list[dict], scale: Scale) -> dict:
    """Per column: test perplexity per domain at step 0 and at the end, MACs per token relative to the dense model,
    load statistics; the ordering of the equal-FLOPs columns, and the spread of their MACs."""
    by = {row["column"]: row for row in rows}
    dense = by["dense_continued"]
    summary: dict = {"domains": list(scale.domains), "steps": scale.train["steps"], "tokens": dense["tokens"]}
    for column, row in by.items():
        entry = {f"test_{d}": round(row["test"][d], 4) for d in (*scale.domains, "average")}
        entry.update({f"test_step0_{d}": round(row["test_step0"][d], 4) for d in (*scale.domains, "average")})
        entry["test_over_dense_continued"] = round(row["test"]["average"] / dense["test"]["average"], 4)
        entry["macs_over_dense"] = round(row["macs_per_token"] / dense["macs_per_token"], 4)
        entry["train_seconds"] = row["train_seconds"]
        if row["load"] is not None:
            entry.update({key: row["load"][key] for key in ("mean_load_entropy", "max_load_share", "dead_experts")})
        summary[column] = entry
    equal = [by[c]["macs_per_token"] for c in EQUAL_FLOPS if c in by]
    summary["equal_flops_macs_spread"] = round(max(equal) / min(equal) - 1, 4)
    ranked = sorted((c for c in EQUAL_FLOPS if c in by), key=lambda c: by[c]["test"]["average"])
    summary["equal_flops_ranking"] = ranked
    if "cmoe" in by:  # CMoE's training-free claim: the carved model before any update, relative to the dense model
        step0 = by["cmoe"]["test_step0"]["average"] / dense["test_step0"]["average"]
        summary["cmoe_step0_over_dense"] = round(step0, 4)
    for baseline in ("sparse_upcycling", "sparse_upcycling_top1"):  # granular top-2; the same MoE at r = 0
        if "drop_upcycling_r0.5" in by and baseline in by:
            gain = 1 - by["drop_upcycling_r0.5"]["test"]["average"] / by[baseline]["test"]["average"]
            summary[f"drop_r0.5_gain_over_{baseline}"] = round(gain, 4)  # > 0: Drop-Upcycling lower perplexity
    summary["paper"] = PAPER
    return summary


RUN_KEYS = ("column", "setup")


def progress_file(quick: bool) -> Path:
    """Where finished columns are appended, one JSON line each."""
    from ..sources import cache_root

    path = cache_root() / "bench" / f"upcycling-{'quick' if quick else 'full'}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def setup_key(column: str, scale: Scale) -> str:
    """A digest of everything besides the column's name that shapes its row: its conversion and training (with the
    resolved defaults, so changing a default re-runs it), the dense model, the evaluation sizes.
    Editing one column's config re-runs that column only."""
    from ..config import load_convert_config, load_train_config

    config = column_config(column, scale)
    training = load_train_config(train_config(column, scale)).model_dump(mode="json")
    resolved = None if config is None else load_convert_config(config).model_dump(mode="json")
    shaping = (scale.source, sorted(scale.model.items()), json.dumps(resolved, sort_keys=True),
               json.dumps(training, sort_keys=True), scale.curve_sequences, scale.test_sequences,
               scale.domains)  # fmt: skip
    return hashlib.sha256(repr(shaping).encode()).hexdigest()[:12]


def finished_runs(quick: bool) -> dict[str, dict]:
    path = progress_file(quick)
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]
    return {json.dumps({k: row.get(k) for k in RUN_KEYS}, sort_keys=True): row for row in rows}


def run(out: str | os.PathLike = "results", quick: bool = False, progress: bool = True, fresh: bool = False) -> dict:
    """Run the benchmark; columns finished by an interrupted run are reused unless ``fresh``."""
    import tempfile

    from .upcycling_eval import DomainHeldOut
    from .upcycling_plots import plot_upcycling

    scale = QUICK if quick else FULL
    began = time.perf_counter()
    dense = dense_model(scale)
    seq_len = scale.train["seq_len"]
    held_out = {"val": DomainHeldOut(dense, scale.domains, "val", scale.curve_sequences, seq_len),
                "test": DomainHeldOut(dense, scale.domains, "test", scale.test_sequences, seq_len)}  # fmt: skip
    if fresh:
        progress_file(quick).unlink(missing_ok=True)
    done = finished_runs(quick)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        bar = tqdm(list(COLUMNS), desc="upcycling bench", unit="column", disable=not progress)
        for column in bar:
            bar.set_postfix_str(column)
            key = {"column": column, "setup": setup_key(column, scale)}
            row = done.get(json.dumps(key, sort_keys=True))
            if row is None:
                start = time.perf_counter()
                row = {**run_column(column, dense, scale, held_out, Path(scratch) / column), **key}
                row["run_seconds"] = round(time.perf_counter() - start, 1)  # conversion, training and evaluation
                with open(progress_file(quick), "a") as handle:
                    handle.write(json.dumps(row) + "\n")
            rows.append(row)
    summary = summarize(rows, scale)
    # the columns' own times, so a benchmark resumed after an interruption still reports its whole cost
    summary["run_seconds"] = round(sum(r["run_seconds"] for r in rows), 1)
    summary["this_call_seconds"] = round(time.perf_counter() - began, 1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_upcycling(rows, scale.domains, out / "upcycling.png")
    path = write_results(
        out, "upcycling", summary, rows, quick=quick,
        scale={"source": scale.source, "model": scale.model, "train": scale.train, "domains": scale.domains,
               "curve_sequences": scale.curve_sequences, "test_sequences": scale.test_sequences},
        columns=COLUMNS, equal_flops=EQUAL_FLOPS, train_overrides=TRAIN_OVERRIDES, notes=NOTES,
        reproduce="make install data && .venv/bin/upcycle bench upcycling" + (" --quick" if quick else ""),
    )  # fmt: skip
    return {"summary": summary, "json": str(path), "png": str(png)}
