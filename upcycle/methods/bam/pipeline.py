"""The BAM pipeline (Zhang et al., arXiv 2408.08274) with its BTX baseline (Sukhbaatar et al., arXiv 2403.07816)
and the dense reference, phase by phase, each phase a folder of ``out`` (see ``upcycle.stages``: finished phases
of the same recipe load, interrupted ones resume from their checkpoints):

    branch-<domain>/     Branch + Train: a copy of the seed continued on its domain (+ general_share of the others)
    mix-<variant>/       Mix: merge([seed, *branches]) by the variant, then trained on all domains
    mix-<variant>-cm/    (compute_matched) a BAM variant's mixture trained for BTX's mix-phase compute: mix steps x
                         MACs(btx) / MACs(variant), the paper's compute-matched comparison (model ``<variant>_cm``)
    dense-continued/     the seed trained on the same mixture with the compute of ``compute_reference`` (branch
                         phase included: dense steps = Σ branch steps + mix steps × MACs(reference) / MACs(dense))
    dense-mix-compute/   the same with the mixture phase's compute only (mix steps × MACs(reference) / MACs(dense))
    dense-same-tokens/   (dense_same_tokens) the same for the tokens the branch and mix phases train on (Σ branch
                         steps + mix steps): equal data, fewer FLOPs than any mixture
    summary.json, bam.png   held-out perplexity per domain for every model; parameters, MACs per token, latency
    routing.png          which experts each domain's text uses in every mixture (FFN and attention routers)

Each phase's folder records the recipe fields it was built from; ``redo`` rebuilds a phase whose recipe changed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from torch import nn

from ...atomic import atomic_write_text
from ...record import copy_model
from ...stages import cached_stage
from .evaluate import domain_perplexity, example_ids, expert_usage, model_costs
from .recipe import VARIANTS, BAMRecipe, load_recipe

COST_SEQUENCES = 8  # sequences of the MAC count and the latency batch


def branch_fingerprint(recipe: BAMRecipe, domain: str) -> dict:
    return {"data": recipe.data, "seed": recipe.seed, "domain": domain,
            "branch": recipe.branch_config(domain).model_dump(mode="json")}  # fmt: skip


def mix_fingerprint(recipe: BAMRecipe, variant: str) -> dict:
    return {
        "branches": [branch_fingerprint(recipe, d) for d in recipe.domains], "variant": variant,
        "merge": {**recipe.routing(variant), "router_init_std": recipe.router_init_std},
        "mix": recipe.mix_config().model_dump(mode="json"),
    }  # fmt: skip


def train_copy(model: nn.Module, config, where: Path, progress: bool) -> nn.Module:
    """A copy of ``model`` trained by ``config`` in ``where`` (resuming its checkpoints); the input is untouched."""
    from ...train import train

    model = copy_model(model)
    train(model, config, where, resume=(where / "checkpoints").is_dir(), progress=progress)
    # the phase is finished (where/model); its resumable checkpoints (weights + optimizer, ~4x the model) are not
    # needed any more, and for a real LM mixed from several branches they are gigabytes
    shutil.rmtree(where / "checkpoints", ignore_errors=True)
    return model


def merged(seed: nn.Module, branches: dict[str, nn.Module], recipe: BAMRecipe, variant: str) -> nn.Module:
    """The untrained mixture of ``variant``: experts in the order seed, then the recipe's domains."""
    from .merge import merge

    models = [seed, *(branches[d] for d in recipe.domains)]
    return merge(models, **VARIANTS[variant], **recipe.routing(variant), router_init_std=recipe.router_init_std,
                 seed=recipe.seed, expert_names=["seed", *recipe.domains],
                 router_init_domains=recipe.router_init_domains())  # fmt: skip


def macs(seed: nn.Module, branches: dict[str, nn.Module], recipe: BAMRecipe, variant: str | None) -> float:
    """Forward MACs of ``variant``'s mixture (None: the dense seed) on the first held-out sequences: training costs
    about three forwards for every model alike, so ratios of these are ratios of training FLOPs per token."""
    from ...eval import count_macs

    ids = example_ids(seed, recipe, COST_SEQUENCES)
    model = seed if variant is None else merged(seed, branches, recipe, variant)
    return count_macs(model, {"input_ids": ids}).total


def dense_steps(seed: nn.Module, branches: dict[str, nn.Module], recipe: BAMRecipe) -> dict:
    """Steps of the dense run that spend the compute of the reference variant's branch and mixture phases
    (``steps``), and of the one that sees the same tokens (``same_tokens_steps``)."""
    ratio = macs(seed, branches, recipe, recipe.compute_reference) / macs(seed, branches, recipe, None)
    branch_steps = sum(recipe.branch_config(d).steps for d in recipe.domains)
    mix_steps = recipe.mix_config().steps
    return {"steps": round(branch_steps + mix_steps * ratio), "branch_steps": branch_steps, "mix_macs_ratio": ratio,
            "same_tokens_steps": branch_steps + mix_steps}  # fmt: skip


def compute_matched_steps(seed: nn.Module, branches: dict[str, nn.Module], recipe: BAMRecipe, variant: str) -> dict:
    """Mix-phase steps that give ``variant`` BTX's mix-phase compute (the BAM paper's compute-matched runs)."""
    ratio = macs(seed, branches, recipe, "btx") / macs(seed, branches, recipe, variant)
    return {"steps": max(1, round(recipe.mix_config().steps * ratio)), "macs_ratio_to_btx": 1 / ratio}


def run_stages(seed: nn.Module, recipe: BAMRecipe | dict | str | Path, out: str | Path, progress: bool = True,
               redo: bool = False) -> dict[str, nn.Module]:  # fmt: skip
    """Every phase; returns ``{"seed", "branch-<domain>"..., <variant>..., <variant>_cm..., "dense_continued",
    "dense_mix_compute", "dense_same_tokens"}`` models (those the recipe asks for)."""
    recipe = load_recipe(recipe)
    out = Path(out)

    def trained(name: str, fingerprint: dict, start: Callable[[], nn.Module], config) -> nn.Module:
        """The phase's model: ``start()`` trained by ``config`` in its folder (built now, or loaded / resumed)."""
        return cached_stage(out / name, fingerprint, lambda: train_copy(start(), config, out / name, progress), redo)

    seed = seed.eval()
    models: dict[str, nn.Module] = {"seed": seed}
    branches = {}
    for domain in recipe.domains:
        branch = trained(f"branch-{domain}", branch_fingerprint(recipe, domain), lambda: seed,
                         recipe.branch_config(domain))  # fmt: skip
        branches[domain] = models[f"branch-{domain}"] = branch
    for variant in recipe.variants:
        models[variant] = trained(f"mix-{variant}", mix_fingerprint(recipe, variant),
                                  lambda v=variant: merged(seed, branches, recipe, v), recipe.mix_config())  # fmt: skip
    if recipe.compute_matched:
        for variant in (v for v in recipe.variants if v != "btx"):
            budget = compute_matched_steps(seed, branches, recipe, variant)
            fingerprint = {**mix_fingerprint(recipe, variant), "compute_matched": budget}
            models[f"{variant}_cm"] = trained(f"mix-{variant}-cm", fingerprint,
                                              lambda v=variant: merged(seed, branches, recipe, v),
                                              recipe.mix_config(budget["steps"]))  # fmt: skip
            atomic_write_text(out / f"mix-{variant}-cm" / "compute.json", json.dumps(budget, indent=2) + "\n")
    if recipe.dense_continued:
        budget = dense_steps(seed, branches, recipe)
        fingerprint = {**mix_fingerprint(recipe, "dense_continued"), "compute": budget}
        models["dense_continued"] = trained("dense-continued", fingerprint, lambda: seed,
                                            recipe.mix_config(budget["steps"]))  # fmt: skip
        atomic_write_text(out / "dense-continued" / "compute.json", json.dumps(budget, indent=2) + "\n")
        if recipe.dense_mix_compute:  # a second, weaker reference: the mixture phase's compute only
            mix_only = round(budget["steps"] - budget["branch_steps"])
            fingerprint = {**mix_fingerprint(recipe, "dense_mix_compute"), "steps": mix_only}
            models["dense_mix_compute"] = trained("dense-mix-compute", fingerprint, lambda: seed,
                                                  recipe.mix_config(mix_only))  # fmt: skip
        if recipe.dense_same_tokens:  # equal data: the tokens the branches and the mixture train on, all in one model
            fingerprint = {**mix_fingerprint(recipe, "dense_same_tokens"), "steps": budget["same_tokens_steps"]}
            models["dense_same_tokens"] = trained("dense-same-tokens", fingerprint, lambda: seed,
                                                  recipe.mix_config(budget["same_tokens_steps"]))  # fmt: skip
    return models


def evaluate_models(models: dict[str, nn.Module], recipe: BAMRecipe, timing: bool = True,
                    splits: tuple[str, ...] = ("val", "test")) -> dict[str, dict]:  # fmt: skip
    """Per model: perplexity per domain on each split, parameters, MACs per token, (``timing``) latency and, for
    the mixtures, which experts each domain's validation text uses."""
    ids = example_ids(models["seed"], recipe, COST_SEQUENCES)
    results = {}
    for name, model in models.items():
        row = {split: domain_perplexity(model, recipe, split) for split in splits}
        results[name] = {**row, **model_costs(model.eval(), ids, timing)}
        usage = expert_usage(model, recipe)
        if usage:
            results[name]["expert_usage"] = usage
    return results


def run_bam(seed: nn.Module, recipe: BAMRecipe | dict | str | Path, out: str | Path, progress: bool = True,
            redo: bool = False, timing: bool = True) -> dict:  # fmt: skip
    """Every phase, then the evaluation; writes ``summary.json`` and ``bam.png`` to ``out`` and returns the summary.

    Headline numbers (``*_ppl``) are the average held-out *test* perplexity over the domains."""
    from .plots import plot_bam, plot_usage

    recipe = load_recipe(recipe)
    out = Path(out)
    models = run_stages(seed, recipe, out, progress, redo)
    results = evaluate_models(models, recipe, timing)
    summary = {"recipe": recipe.model_dump(mode="json"), "models": results}
    compute_matched = [f"{v}_cm" for v in recipe.variants if v != "btx"] if recipe.compute_matched else []
    for name in [*recipe.variants, *compute_matched, "dense_continued", "dense_mix_compute", "dense_same_tokens",
                 "seed"]:  # fmt: skip
        if name in results:
            summary[f"{name}_ppl"] = results[name]["test"]["average"]
    if "btx" in results and "bam_expert_kv" in results:
        summary["bam_over_btx"] = summary["bam_expert_kv_ppl"] / summary["btx_ppl"]
    if "btx" in results and "bam_expert_kv_cm" in results:
        summary["bam_cm_over_btx"] = summary["bam_expert_kv_cm_ppl"] / summary["btx_ppl"]
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    summary["plot"] = str(plot_bam({"seed 0": results}, list(recipe.domains), out / "bam.png"))
    summary["usage_plot"] = str(plot_usage(results, list(recipe.domains), out / "routing.png"))
    return summary
