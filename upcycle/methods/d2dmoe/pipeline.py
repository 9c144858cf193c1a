"""The D2DMoE pipeline (Szatkowski et al., arXiv 2310.04361) and its MoEfication baseline (arXiv 2110.01786), stage
by stage, each stage a folder of ``out`` holding its model (``upcycle.load``-able) so an interrupted run resumes at
the first unfinished stage (and a training stage at its latest checkpoint):

    0-attention/       ViT only, optional: Q/K/V/O -> equal-cost ReLU MLPs, distilled per module (§3.4)
    1-sparsify/        FFN activations -> ReLU, fine-tuned with the squared-Hoyer (or L1) penalty (§3.1)
    2-<method>/        the FFNs split into equal experts by balanced k-means, with the method's router (§3.2)
    3-<method>-routers/  routers fitted with the backbone frozen and every expert running (§3.3)
    sweep-<method>.json  τ (D2DMoE) or k (MoEfication) swept on the held-out splits: accuracy vs MACs (§3.4); the
                         rows also kept in the stage folder (``sweep.json``): reused while what they measured holds
    summary.json, curves.png   every sweep with the dense and ReLU reference points

Both methods share stages 0-1 and get the same experts (same partition, same seed); only the router differs.
Each stage folder records the recipe fields it was built from (``stage.json``: its own and its predecessors'). A
finished stage is reused only when they match the recipe; otherwise the run stops and says which fields changed,
unless ``redo=True``, which rebuilds that stage and everything after it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ...atomic import atomic_write_text
from ...eval.held_out import HeldOut
from ...layers import moe_layers, set_backend, set_tau, set_top_k
from ...record import copy_model
from ...stages import cached_stage, same_recipe, save_stage
from .dynamic_k_router import DynamicKRouter
from .recipe import D2DMoERecipe, load_recipe
from .relu import activation_sparsity, swap_to_relu
from .sweep import lowest_fraction_within, macs_per_example, sweep


def stage_fingerprints(recipe: D2DMoERecipe, method: str | None = None) -> dict[str, dict]:
    """The recipe fields each stage depends on, its predecessors' included (keyed by stage folder)."""
    attention = {"data": recipe.data, "seed": recipe.seed,
                 "attention": None if recipe.attention is None else recipe.attention.model_dump()}  # fmt: skip
    sparsify = {**attention, "sparsify": recipe.sparsify_config().model_dump(mode="json")}
    prints = {"0-attention": attention, "1-sparsify": sparsify}
    for name in recipe.methods if method is None else [method]:
        split = {**sparsify, "method": name, "num_experts": recipe.num_experts, "partition": recipe.partition,
                 "router_hidden": recipe.router_hidden, **router_options(recipe, name)}  # fmt: skip
        prints[f"2-{name}"] = split
        prints[f"3-{name}-routers"] = {**split, "routers": recipe.router_config().model_dump(mode="json")}
    return prints


def router_options(recipe: D2DMoERecipe, method: str) -> dict:
    """The method's own router options of the recipe (MoEfication's activation and targets; none for D2DMoE)."""
    if method != "moefication":
        return {}
    return {"router_activation": recipe.moefication_activation, "router_targets": recipe.moefication_targets}


def attention_stage(dense: nn.Module, recipe: D2DMoERecipe, out: Path, progress: bool) -> nn.Module:
    from . import replace_attention_projections
    from .distill import distill_attention_projections

    stage = recipe.attention
    model = copy_model(dense)
    replace_attention_projections(model, stage.hidden_ratio, torch.Generator().manual_seed(recipe.seed))
    report = distill_attention_projections(model, dense, recipe.data, stage.steps, stage.batch_size, stage.lr,
                                           stage.sparsity, seed=recipe.seed, progress=progress)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "distillation.json", json.dumps(report, indent=2) + "\n")
    save_stage(model, out)
    return model


def sparsify_stage(model: nn.Module, recipe: D2DMoERecipe, out: Path, progress: bool) -> nn.Module:
    from ...train import train

    model = copy_model(model)
    swap_to_relu(model)
    train(model, recipe.sparsify_config(), out, resume=(out / "checkpoints").is_dir(), progress=progress)
    held_out = HeldOut(model, recipe.data, "val", examples=512, seq_len=recipe.sparsify_config().seq_len)
    sparsity = activation_sparsity(model, held_out.batches())
    atomic_write_text(out / "activation_sparsity.json", json.dumps(sparsity, indent=2) + "\n")
    return model


def split_stage(model: nn.Module, recipe: D2DMoERecipe, method: str, out: Path) -> nn.Module:
    from ...convert import convert

    options = {"partition": recipe.partition, "router_hidden": recipe.router_hidden, **router_options(recipe, method)}
    moe = convert(model, method, num_experts=recipe.num_experts, top_k=1, layers="all", seed=recipe.seed,
                          backend="sorted", progress=False, **options)  # fmt: skip
    save_stage(moe, out)
    return moe


def router_stage(moe: nn.Module, recipe: D2DMoERecipe, out: Path, progress: bool) -> nn.Module:
    from ...train import train

    moe = copy_model(moe)
    train(moe, recipe.router_config(), out, resume=(out / "checkpoints").is_dir(), progress=progress)
    for param in moe.parameters():  # train() froze all but the routers; the returned model is whole again
        param.requires_grad_(True)
    return moe


def run_stages(dense: nn.Module, recipe: D2DMoERecipe | dict | str | Path, out: str | Path,
               progress: bool = True, redo: bool = False) -> dict[str, nn.Module]:  # fmt: skip
    """Stages 0-3; returns ``{"sparse": ReLU model, method: model with fitted routers}``. Finished stages of the
    same recipe load (see :func:`cached_stage`)."""
    recipe = load_recipe(recipe)
    out = Path(out)
    prints = stage_fingerprints(recipe)

    def stage(name: str, build: Callable[[Path], nn.Module]) -> nn.Module:
        return cached_stage(out / name, prints[name], lambda: build(out / name), redo)

    model = dense
    if recipe.attention is not None:
        model = stage("0-attention", lambda where: attention_stage(dense, recipe, where, progress))
    sparse = stage("1-sparsify", lambda where: sparsify_stage(model, recipe, where, progress))
    models = {"sparse": sparse}
    for method in recipe.methods:
        split = stage(f"2-{method}", lambda where, m=method: split_stage(sparse, recipe, m, where))
        fitted = stage(f"3-{method}-routers", lambda where, s=split: router_stage(s, recipe, where, progress))
        set_backend(fitted, "sorted")  # inference: only the selected pairs, no padding
        models[method] = fitted
    return models


def sweep_methods(models: dict[str, nn.Module], dense: nn.Module, recipe: D2DMoERecipe, out: Path,
                  splits: tuple[str, ...] = ("val", "test"), mac_examples: int = 256) -> dict:  # fmt: skip
    """The τ / k sweeps of every method and the dense and ReLU-sparse reference points, written to ``out``."""
    seq_len = recipe.sparsify_config().seq_len
    held_out = {s: HeldOut(dense, recipe.data, s, recipe.eval_examples, seq_len) for s in splits}
    dense_macs = macs_per_example(dense, held_out[splits[0]], mac_examples)
    results = {
        "dense": {s: h.metric(dense) for s, h in held_out.items()} | {"flops_fraction": 1.0},
        "sparse": {s: h.metric(models["sparse"]) for s, h in held_out.items()}
        | {"flops_fraction": macs_per_example(models["sparse"], held_out[splits[0]], mac_examples) / dense_macs},
    }
    prints = stage_fingerprints(recipe)
    for method in recipe.methods:
        points, apply = (recipe.taus, set_tau) if method == "d2dmoe" else (recipe.ks(), set_top_k)
        measured = {"model": prints[f"3-{method}-routers"], "points": list(points), "splits": list(splits),
                    "examples": recipe.eval_examples, "seq_len": seq_len, "mac_examples": mac_examples}  # fmt: skip
        if method == "d2dmoe":  # an inference rule, set here like τ: the fitted routers do not depend on it
            set_zero_runs_all(models[method], recipe.zero_runs_all)
            measured["zero_runs_all"] = recipe.zero_runs_all

        def run(model=models[method], points=points, apply=apply, method=method) -> list[dict]:
            return sweep(model, dense_macs, points, apply, held_out, mac_examples, desc=f"{method} sweep")

        rows = cached_sweep(out / f"3-{method}-routers" / "sweep.json", measured, run)
        results[method] = rows
        atomic_write_text(out / f"sweep-{method}.json", json.dumps(rows, indent=2) + "\n")
    return results


def set_zero_runs_all(model: nn.Module, value: bool) -> None:
    """Whether a token predicted 0 for every expert runs all of them, on every dynamic-k router of ``model``."""
    for _, layer in moe_layers(model):
        if isinstance(layer.router, DynamicKRouter):
            layer.router.zero_runs_all = value


def cached_sweep(path: Path, measured: dict, run: Callable[[], list[dict]]) -> list[dict]:
    """The sweep's rows kept at ``path`` (in its model's stage folder, so a rebuilt stage drops them) if they were
    measured as ``measured`` says (that model, points, held-out sets), else ``run()``'s, kept there with it. A model
    that did not come from a stage folder is swept every time."""
    kept = json.loads(path.read_text()) if path.is_file() else {}
    if same_recipe(kept.get("measured"), measured):
        return kept["rows"]
    rows = run()
    if path.parent.is_dir():
        atomic_write_text(path, json.dumps({"measured": measured, "rows": rows}, indent=2) + "\n")
    return rows


def run_d2dmoe(dense: nn.Module, recipe: D2DMoERecipe | dict | str | Path, out: str | Path,
               progress: bool = True, redo: bool = False) -> dict:  # fmt: skip
    """Every stage, then the sweeps; writes ``summary.json`` and ``curves.png`` (validation accuracy: the split
    operating points are chosen on) to ``out`` and returns the summary."""
    from .plots import plot_curves

    recipe = load_recipe(recipe)
    out = Path(out)
    models = run_stages(dense, recipe, out, progress, redo)
    results = sweep_methods(models, dense, recipe, out)
    summary = {"recipe": recipe.model_dump(mode="json"), **results}
    for method in recipe.methods:
        point = lowest_fraction_within(results[method], results["dense"]["val"], "val")
        summary[f"{method}.flops_fraction_at_1pt_drop"] = None if point is None else point["flops_fraction"]
        summary[f"{method}.point_at_1pt_drop"] = None if point is None else point["point"]
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    panel = {"dense": results["dense"], "variants": {m: results[m] for m in recipe.methods}}
    summary["curves_png"] = str(plot_curves({type(dense).__name__: panel}, out / "curves.png", split="val"))
    return summary
