"""``upcycle bench jetpack``: MoE Jetpack's Table 1 (arXiv 2406.04801) at a scale two CPU cores can run.

Pre-training (cached under ``$UPCYCLE_CACHE/pretrained``; our "ImageNet-21k" is Fashion-MNIST): a small ViT "T"
(the model being fine-tuned) and a 2× wider ViT "S" of the same depth (the predecessor MoE Jetpack samples experts
from, as the paper fills ViT-T experts from ViT-S). Then every column is fine-tuned on each downstream set
(MNIST 5k, sklearn digits) with one recipe (same epochs, augmentation, optimiser):

    dense_scratch      ViT-T, random init
    dense_pretrained   ViT-T from its Fashion-MNIST checkpoint (fresh head)
    softmoe_scratch    ViT-T with Soft MoE (arXiv 2308.00951) in the last half of the blocks, all weights at random
                       init, configured as that paper and the released SoftMoELayerWrapper: one single-slot expert
                       per token, each as wide as the dense FFN, L2-normalised tokens and slot queries with a
                       learnable scale
    jetpack            ViT-T checkpoint + SpheroMoE dual-path layers in the last half, experts sampled by
                       activation importance out of ViT-S's FFNs (calibrated on the downstream train split)
    sparse_upcycling   the paper's recycling-ablation baseline: the same SpheroMoE layer and switches as the jetpack
                       column, core experts copies of ViT-T's own FFN (universal ones random slices of it)

Test accuracy is read once per run, after training; every choice (the ablation's defaults, the convergence
epochs) uses the validation split. The ablation (one downstream set, one seed) varies the recycling strategy under
SpheroMoE, Soft MoE vs SpheroMoE on the same recycled experts, and the paper-vs-released-code switches.
Convergence speed-up: epochs Soft MoE from scratch needs to reach its final validation accuracy, divided by the
epochs MoE Jetpack needs to reach the same accuracy; and the same against the dense pre-trained model's final
accuracy. The paper's numbers (:data:`PAPER`, ViT-T) are written beside ours: for each column its ImageNet-1k
top-1 and its mean over the seven small downstream sets, and the paper's speed-ups.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...provenance import write_results


@dataclass(frozen=True)
class Family:
    """One model family of the table: the model fine-tuned ("T"), its wider predecessor ("S"), where MoE goes."""

    name: str
    target: tuple[str, dict]  # a pre-training preset (or timm:ARCH) and architecture overrides
    predecessor: tuple[str, dict]  # the same depth, wider
    layers: str | list[int]  # which FFNs become MoE layers
    datasets: tuple[str, ...]
    seeds: tuple[int, ...]
    pretrain: dict  # training options of both pre-training runs
    finetune: dict = field(default_factory=dict)  # overrides of the shared fine-tuning recipe (all columns alike)


@dataclass(frozen=True)
class Scale:
    families: tuple[Family, ...]
    finetune: dict  # training options shared by every fine-tuning run
    ablation_data: str = "mnist5k"  # on the first family, its first seed
    calibration_images: int = 512
    ablations: dict[str, dict] = field(default_factory=dict)


ABLATIONS = {  # name -> moe_jetpack options on top of the defaults (importance, SpheroMoE, paper switches)
    "strategy=graph": {"strategy": "graph"},
    "strategy=uniform": {"strategy": "uniform"},
    "strategy=random": {"strategy": "random"},
    "strategy=copy (sparse upcycling)": {"strategy": "copy"},
    "router=soft (Soft MoE + recycling)": {"slot_router": "soft"},
    "key_norm=off (paper text; our default since)": {"key_norm": False},
    "combine=entmax15 (released code)": {"combine": "entmax15"},
    "temperatures=one": {"temperatures": "one"},
    "expert_dropout=0.1 paper": {"expert_dropout": 0.1, "dropout_variant": "paper"},
    "expert_dropout=0.1 released": {"expert_dropout": 0.1, "dropout_variant": "released"},
    "universal_sampling=wide_then_thin (released code)": {"universal_sampling": "wide_then_thin"},
    "channel_statistic=input_output": {"channel_statistic": "input_output"},
    "readout=mean_pool (released code)": {"readout": "mean_pool"},
    "preset=released (conversion switches)": {"preset": "released"},
}

# The paper's Table 1 (arXiv 2406.04801; ViT-T, ImageNet-21k pre-training, top-1 %) and its recycling ablation
# (ImageNet-1k, SpheroMoE everywhere: sparse upcycling 79.1 against importance 79.9); its ConvNeXt-F rows are not
# copied here.
PAPER_TABLE = {
    "dense_scratch": {"ImageNet-1k": 73.9, "CIFAR-10": 92.4, "CIFAR-100": 72.3, "Flowers": 62.4, "Pets": 25.0,
                      "STL-10": 61.5, "Food-101": 79.6, "DTD": 49.4},
    "dense_pretrained": {"ImageNet-1k": 75.6, "CIFAR-10": 97.0, "CIFAR-100": 81.4, "Flowers": 81.9, "Pets": 68.6,
                         "STL-10": 83.4, "Food-101": 86.9, "DTD": 62.5},
    "softmoe_scratch": {"ImageNet-1k": 77.1, "CIFAR-10": 92.9, "CIFAR-100": 75.9, "Flowers": 70.8, "Pets": 45.5,
                        "STL-10": 67.7, "Food-101": 82.0, "DTD": 51.3},
    "jetpack": {"ImageNet-1k": 79.9, "CIFAR-10": 97.9, "CIFAR-100": 88.4, "Flowers": 95.4, "Pets": 84.3,
                "STL-10": 95.3, "Food-101": 89.5, "DTD": 69.1},
    "sparse_upcycling": {"ImageNet-1k": 79.1},
}  # fmt: skip
PAPER_RECYCLING = {"sparse_upcycling": 79.1, "random": 79.5, "uniform": 79.6, "graph": 79.8, "importance": 79.9}
PAPER = {
    "table1_vit_t_top1": PAPER_TABLE,
    "recycling_ablation_imagenet_top1": PAPER_RECYCLING,
    "convergence_speedup": {"imagenet_1k": 2.0, "small_sets_up_to": 8.0},
}

PRETRAIN = {"data": "fashion_mnist", "epochs": 3, "batch_size": 64, "lr": 1e-3, "label_smoothing": 0.1}
CONVNEXT_32PX = {"in_chans": 1, "pretrained_cfg_overlay": {"input_size": [1, 32, 32]}}
FINETUNE = {"batch_size": 64, "lr": 1e-3, "weight_decay": 0.05, "warmup": 0.1, "label_smoothing": 0.1,
            "augment": True, "precision": "fp32", "epochs": 12}  # fmt: skip
FULL = Scale(
    families=(
        # d 64 / FFN 256 sampled from d 128 / FFN 512, both 4 blocks: MoE in blocks 2-3
        Family("vit", ("vit_xxs", {}), ("vit_xs", {}), "last_half", ("mnist5k", "digits"), (0, 1), PRETRAIN),
        # ConvNeXt-Atto sampled from ConvNeXt-Pico (1.6× wider, same depths 2-2-6-2): MoE in the third stage's six
        # blocks, where a 32 px image is 2×2 positions (the fourth stage has one)
        Family(
            "convnext",
            ("convnext_t", {}),
            ("timm:convnext_pico", CONVNEXT_32PX),
            list(range(4, 10)),
            ("mnist5k", "digits"),
            (0,),
            {**PRETRAIN, "epochs": 2},
            {"epochs": 6},  # ~4× the ViT's cost per image: half the epochs keeps the whole run near the budget
        ),
    ),
    finetune=FINETUNE,
    ablations=ABLATIONS,
)
QUICK = Scale(
    families=(
        Family(
            "vit",
            ("vit_xxs", {"embed_dim": 32, "depth": 2}),
            ("vit_xxs", {"depth": 2}),
            "last_half",
            ("mnist5k", "digits"),
            (0,),
            {**PRETRAIN, "epochs": None, "steps": 40},
        ),
    ),
    finetune={**FINETUNE, "epochs": 2},
    calibration_images=64,
    ablations={k: ABLATIONS[k] for k in ("strategy=copy (sparse upcycling)",)},
)
COLUMNS = ("dense_scratch", "dense_pretrained", "softmoe_scratch", "jetpack", "sparse_upcycling")
# What the ablation varies: the defaults before it chose key_norm=off (every row is this plus its own switch)
ABLATION_BASELINE = {"key_norm": True}
BASELINE_VARIANT = "baseline (importance, SpheroMoE, key norm on)"


def pretrained(family: Family, progress: bool) -> dict[str, Path]:
    from ...pretrain import cached_pretrained

    return {
        name: cached_pretrained(arch, family.pretrain, progress=progress, model=overrides)
        for name, (arch, overrides) in (("target", family.target), ("predecessor", family.predecessor))
    }


def build_column(column: str, family: Family, checkpoints: dict[str, Path], data: str, seed: int,
                 calibration_images: int, options: dict | None = None) -> torch.nn.Module:  # fmt: skip
    """The model a column fine-tunes, built deterministically from ``seed``."""
    from ...adapters import find_adapter
    from ...config import load_convert_config, select_layers
    from ...convert import convert
    from ...export import load
    from ...layers import moe_layers
    from ...pretrain import build_dense

    if column in ("dense_scratch", "softmoe_scratch"):
        arch, overrides = family.target
        model = build_dense(arch, num_classes=10, seed=seed, **overrides)
    else:
        model = load(checkpoints["target"])
        torch.manual_seed(seed)
        model.reset_classifier(10)  # a new task gets a fresh head
    model.train()
    if column.startswith("dense"):
        return model
    recipe = {"layers": family.layers, "seed": seed, "calibration_data": data, "calibration_images": calibration_images}
    if column == "softmoe_scratch":
        # Soft MoE as its paper (and the released SoftMoELayerWrapper, compress_ratio 1) builds it: one single-slot
        # expert per token, no universal path, each expert as wide as the dense FFN, normalised router
        adapter = find_adapter(model)
        sites = adapter.ffn_sites(model)
        hidden = adapter.read_ffn(model, sites[select_layers(len(sites), family.layers)[0]]).d_hidden
        recipe.update(strategy="copy", slot_router="soft", soft_normalize=True, universal_experts=0,
                      core_hidden=hidden)  # fmt: skip
        moe = convert(model, "moe_jetpack", progress=False, **recipe)
        for _, layer in moe_layers(moe):
            layer.experts.core.reset_parameters()  # from scratch: no weight comes from the dense FFN
        return moe
    if column == "sparse_upcycling":  # the same layer and switches as the jetpack column, experts copied
        return convert(model, "moe_jetpack", progress=False, **recipe, strategy="copy")
    options = dict(options or {})
    preset = options.pop("preset", None)
    recipe.update(predecessor=str(checkpoints["predecessor"]), **options)
    if preset is None:
        return convert(model, "moe_jetpack", progress=False, **recipe)
    # a preset's conversion switches (its training switches would change the shared recipe, so they stay out)
    return convert(model, config=load_convert_config(None, preset=preset, method="moe_jetpack", **recipe),
                   progress=False)  # fmt: skip


def finetune(model, data: str, recipe: dict, seed: int, workdir: Path) -> dict:
    """Fine-tune with ``recipe``; validation every epoch, test once at the end."""
    from ...data import load_dataset
    from ...eval.report import evaluate_model
    from ...train import train

    steps_per_epoch = max(1, len(load_dataset(data, "train")) // recipe["batch_size"])
    recipe = {**recipe, "data": data, "seed": seed, "eval_every": steps_per_epoch,
              "log_every": steps_per_epoch, "checkpoint_every": 10**9}  # fmt: skip
    start = time.perf_counter()
    summary = train(model, recipe, workdir, progress=False)
    seconds = time.perf_counter() - start
    curve = [row for row in _read_rows(workdir / "metrics.csv") if row["split"] == "val"]
    test = evaluate_model(model, data, "test", batch_size=256)
    return {
        "val_curve": [float(row["accuracy"]) for row in curve],
        "val": summary["val"]["accuracy"],
        "test": test["accuracy"],
        "macs_per_image": test["macs_per_sample"],
        "parameters": test["parameters"]["total"],
        "active_parameters": test["parameters"]["active"],
        "train_seconds": round(seconds, 1),
        "images_per_second": round(len(curve) * steps_per_epoch * recipe["batch_size"] / seconds, 1),
    }


def _read_rows(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def epochs_to_reach(curve: list[float], target: float) -> int | None:
    """1-based epoch at which ``curve`` first reaches ``target`` (None: never)."""
    return next((epoch for epoch, value in enumerate(curve, 1) if value >= target - 1e-9), None)


def convergence_speedup(curve: list[float], reference: list[float]) -> float | None:
    """Epochs ``reference`` needs to reach its own final accuracy, over the epochs ``curve`` needs to reach it (None:
    ``curve`` never does)."""
    target = reference[-1]
    epochs = epochs_to_reach(curve, target)
    return None if epochs is None else round(epochs_to_reach(reference, target) / epochs, 2)


def summarize(rows: list[dict], scale: Scale) -> dict:
    """Mean ± half-range test accuracy per (family, set, column); the ViT keys carry no family prefix."""
    summary: dict = {}
    speedups, speedups_dense = [], []
    for family in scale.families:
        for data in family.datasets:
            prefix = data if family is scale.families[0] else f"{family.name}.{data}"
            curves = {}
            for column in COLUMNS:
                runs = [r for r in rows if (r["family"], r["data"], r["column"], r["kind"]) ==
                        (family.name, data, column, "main")]  # fmt: skip
                tests = [r["test"] for r in runs]
                summary[f"{prefix}.{column}"] = round(statistics.mean(tests), 4)
                summary[f"{prefix}.{column}.spread"] = round((max(tests) - min(tests)) / 2, 4)
                curves[column] = [statistics.mean(v) for v in zip(*(r["val_curve"] for r in runs), strict=True)]
            for column in COLUMNS:  # the paper's numbers beside ours
                paper = PAPER_TABLE.get(column, {})
                small = [value for name, value in paper.items() if name != "ImageNet-1k"]
                summary[f"{prefix}.{column}.paper_imagenet"] = paper.get("ImageNet-1k")
                small_mean = round(statistics.mean(small), 1) if small else None
                summary[f"{prefix}.{column}.paper_small_sets_mean"] = small_mean
            speedup = convergence_speedup(curves["jetpack"], curves["softmoe_scratch"])
            summary[f"{prefix}.convergence_speedup"] = speedup
            if speedup is not None and family is scale.families[0]:
                speedups.append(speedup)
            vs_dense = convergence_speedup(curves["jetpack"], curves["dense_pretrained"])
            summary[f"{prefix}.convergence_speedup_vs_dense_pretrained"] = vs_dense
            if vs_dense is not None:
                speedups_dense.append(vs_dense)
            summary[f"{prefix}.ordering_holds"] = (
                summary[f"{prefix}.jetpack"]
                > summary[f"{prefix}.dense_pretrained"]
                > summary[f"{prefix}.softmoe_scratch"]
            )
            summary[f"{prefix}.jetpack_ge_sparse_upcycling"] = (
                summary[f"{prefix}.jetpack"] >= summary[f"{prefix}.sparse_upcycling"]
            )
    summary["convergence_speedup"] = round(max(speedups), 2) if speedups else None  # the paper's "up to"
    summary["convergence_speedup_vs_dense_pretrained"] = round(max(speedups_dense), 2) if speedups_dense else None
    summary["paper"] = PAPER
    ablation = {r["variant"]: r for r in rows if r["kind"] == "ablation"}
    if ablation:
        summary["ablation_val"] = {name: round(r["val"], 4) for name, r in ablation.items()}
        summary["ablation_test"] = {name: round(r["test"], 4) for name, r in ablation.items()}
        summary["ablation_best_by_val"] = max(ablation, key=lambda name: ablation[name]["val"])
        copy = ablation.get("strategy=copy (sparse upcycling)")
        if copy is not None:
            summary["importance_ge_sparse_upcycling"] = ablation[BASELINE_VARIANT]["test"] >= copy["test"]
    return summary


RUN_KEYS = ("kind", "family", "data", "column", "seed", "variant", "setup")


def progress_file(quick: bool) -> Path:
    """Where finished runs are appended, one JSON line each."""
    from ...sources import cache_root

    path = cache_root() / "bench" / f"jetpack-{'quick' if quick else 'full'}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def setup_key(family: Family, scale: Scale, column: str, options: dict | None) -> str:
    """A digest of everything besides the run's name that shapes its result: editing one family, the recipe or
    (for the MoE Jetpack column) the method's defaults re-runs only what it touches."""
    from ...presets import method_choices, preset_values
    from .recycling import JetpackOptions

    moe = column in ("jetpack", "sparse_upcycling", "softmoe_scratch")
    defaults = {name: f.default for name, f in JetpackOptions.model_fields.items()} if moe else {}
    preset = (options or {}).get("preset")
    switches = sorted(preset_values(method_choices("moe_jetpack"), preset).items()) if preset else []
    shaping = (family, scale.finetune, scale.calibration_images, sorted((options or {}).items()),
               sorted(defaults.items()), switches)  # fmt: skip
    return hashlib.sha256(repr(shaping).encode()).hexdigest()[:12]


def finished_runs(quick: bool) -> dict[str, dict]:
    path = progress_file(quick)
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]
    return {json.dumps({k: row.get(k) for k in RUN_KEYS}, sort_keys=True): row for row in rows}


def run(out: str | os.PathLike = "results", quick: bool = False, progress: bool = True, fresh: bool = False) -> dict:
    """Run the benchmark; finished runs of an interrupted one are reused unless ``fresh``."""
    from .plots import plot_ablation, plot_curves

    scale = QUICK if quick else FULL
    began = time.perf_counter()
    checkpoints = {family.name: pretrained(family, progress) for family in scale.families}
    pretrain_seconds = time.perf_counter() - began
    first = scale.families[0]
    plan = [("main", family, data, column, seed, None, None) for family in scale.families
            for data in family.datasets for seed in family.seeds for column in COLUMNS]  # fmt: skip
    plan += [("ablation", first, scale.ablation_data, "jetpack", first.seeds[0], name, {**ABLATION_BASELINE, **options})
             for name, options in {BASELINE_VARIANT: {}, **scale.ablations}.items()]  # fmt: skip
    if fresh:
        progress_file(quick).unlink(missing_ok=True)
    done = finished_runs(quick)  # runs of an interrupted benchmark with the same setup are not repeated
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        bar = tqdm(plan, desc="jetpack bench", unit="run", disable=not progress)
        for index, (kind, family, data, column, seed, variant, options) in enumerate(bar):
            bar.set_postfix_str(f"{family.name} {data} {variant or column} seed {seed}")
            key = {
                "kind": kind,
                "family": family.name,
                "data": data,
                "column": column,
                "seed": seed,
                "variant": variant,
                "setup": setup_key(family, scale, column, options),
            }
            row = done.get(json.dumps(key, sort_keys=True))
            if row is None:
                start = time.perf_counter()
                model = build_column(column, family, checkpoints[family.name], data, seed, scale.calibration_images,
                                     options)  # fmt: skip
                row = {
                    **key,
                    **finetune(
                        model, data, {**scale.finetune, **family.finetune}, seed, Path(scratch) / f"run-{index}"
                    ),
                }
                row["run_seconds"] = round(time.perf_counter() - start, 1)  # conversion + training + evaluation
                with open(progress_file(quick), "a") as handle:
                    handle.write(json.dumps(row) + "\n")
            rows.append(row)
    summary = summarize(rows, scale)
    summary["pretrain_seconds"] = round(pretrain_seconds, 1)
    # the runs' own times, so a benchmark resumed after an interruption still reports its whole cost
    summary["finetune_seconds"] = round(sum(r["run_seconds"] for r in rows), 1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    curves_png, ablation_png = out / "jetpack_curves.png", out / "jetpack_ablation.png"
    plot_curves(rows, COLUMNS, curves_png)
    plot_ablation([r for r in rows if r["kind"] == "ablation"], ablation_png)
    families = {f.name: {"target": f.target, "predecessor": f.predecessor, "layers": f.layers, "seeds": f.seeds,
                         "pretrain": f.pretrain, "finetune": {**scale.finetune, **f.finetune}}
                for f in scale.families}  # fmt: skip
    path = write_results(
        out, "jetpack", summary, rows, quick=quick, families=families, finetune=scale.finetune,
        calibration_images=scale.calibration_images,
        reproduce="make install data && .venv/bin/upcycle bench jetpack" + (" --quick" if quick else ""),
    )  # fmt: skip
    return {"summary": summary, "json": str(path), "png": f"{curves_png}, {ablation_png}"}
