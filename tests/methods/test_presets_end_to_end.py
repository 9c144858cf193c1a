"""Each method's shipped recipe runs end to end under ``--preset paper`` and ``--preset released`` (shrunk to
seconds: tiny models, a few steps), and the run records the preset's values in the recipe it saves."""

from pathlib import Path

import pytest
import yaml

from upcycle.presets import METHOD_CHOICES, preset_values
from upcycle.recipes import recipe_file
from upcycle.run import run_recipe

pytestmark = pytest.mark.slow

TINY_VIT = {"vit_xxs": {"embed_dim": 32, "depth": 2}, "vit_xs": {"embed_dim": 64, "depth": 2}}
TINY_PRETRAIN = {"data": "digits", "steps": 4, "batch_size": 16, "eval_batches": 1}
STEPS = {"steps": 3, "batch_size": 16, "eval_batches": 1, "log_every": 1}
TINY_LM = {"lm_tiny_parallel": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "num_key_value_heads": 2}}  # fmt: skip
LM_STEPS = {"steps": 3, "batch_size": 4, "seq_len": 32, "eval_batches": 1, "log_every": 1}


def shrunk(name: str) -> dict:
    """The shipped recipe with its models and steps cut down; every method switch stays as shipped."""
    recipe = yaml.safe_load(recipe_file(name).read_text())
    if name == "jetpack_mnist5k":
        recipe["run"] |= {"source": "pretrained:vit_xxs", "model": TINY_VIT, "pretrain": TINY_PRETRAIN}
        recipe["convert"]["options"] |= {"calibration_data": "digits", "calibration_images": 16}
        recipe["train"] = {key: value for key, value in recipe["train"].items() if key != "epochs"}
        recipe["train"] |= {**STEPS, "data": "digits", "eval_every": 3}
    elif name == "d2dmoe_vit_fashion_mnist":
        recipe["run"] |= {"source": "pretrained:vit_xxs", "model": TINY_VIT, "pretrain": TINY_PRETRAIN}
        recipe["d2dmoe"] |= {"data": "digits", "num_experts": 4, "eval_examples": 32, "top_ks": [1, 4],
                             "attention": {"steps": 2, "batch_size": 8}}  # fmt: skip
        for stage in ("sparsify", "routers"):
            recipe["d2dmoe"][stage] = {key: value for key, value in recipe["d2dmoe"][stage].items() if key != "epochs"}
            recipe["d2dmoe"][stage] |= STEPS
    elif name == "bam_lm_tiny_text":
        recipe["run"] |= {"model": TINY_LM, "pretrain": {**LM_STEPS, "data": "text_mixture"}}
        recipe["bam"] |= {"eval_sequences": 4, "branch": LM_STEPS, "mix": LM_STEPS}
    return recipe


@pytest.mark.parametrize("preset", ["paper", "released"])
@pytest.mark.parametrize(("method", "recipe"), [("moe_jetpack", "jetpack_mnist5k"),
                                                ("d2dmoe", "d2dmoe_vit_fashion_mnist"),
                                                ("bam", "bam_lm_tiny_text")])  # fmt: skip
def test_shipped_recipe_runs_end_to_end_under_the_preset(method, recipe, preset, tmp_path, monkeypatch):
    from upcycle.data.paths import data_root

    monkeypatch.setenv("UPCYCLE_DATA", str(data_root()))  # the prepared datasets, with a fresh cache for the rest
    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / f"{recipe}.yaml"
    path.write_text(yaml.safe_dump(shrunk(recipe)))
    summary = run_recipe(path, tmp_path / "run", progress=False, preset=preset)
    assert summary["out"] == str(tmp_path / "run")
    saved = saved_recipes(tmp_path / "run")
    if "recipe" in summary:  # a pipeline's summary holds the section it ran
        saved.setdefault(method, []).append(summary["recipe"])
    checked = 0
    for field, value in preset_values(METHOD_CHOICES.get(method), preset).items():
        section, *keys = field.split(".")
        if section in ("convert", "d2dmoe", "bam"):
            assert any(lookup(found, keys) == value for found in saved.get(section, [])), field
            checked += 1
    assert checked or preset == "released", "the paper preset of every method sets a recipe switch"


def saved_recipes(run: Path) -> dict[str, list[dict]]:
    """The convert sections of the recipes the run saved next to its models (recipe.yaml)."""
    found: dict[str, list[dict]] = {}
    for file in run.rglob("recipe.yaml"):
        data = yaml.safe_load(file.read_text()) or {}
        found.setdefault("convert", []).append(data.get("convert", data))
    return found


def lookup(mapping: dict, keys: list[str]):
    for key in keys:
        if not isinstance(mapping, dict) or key not in mapping:
            return object()
        mapping = mapping[key]
    return mapping
