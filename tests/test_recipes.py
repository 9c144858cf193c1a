"""Every YAML recipe shipped in recipes/ validates against the config models."""

from pathlib import Path

import pytest
import yaml

from upcycle.config import load_convert_config, load_train_config

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path):
    sections = yaml.safe_load(path.read_text())
    assert set(sections) <= {"run", "train", "convert", "d2dmoe", "bam"}, (
        f"{path.name}: unknown sections {set(sections)}"
    )
    if "run" in sections:
        from upcycle.run import load_run_recipe

        load_run_recipe(path)
    if "bam" in sections:
        from upcycle.bam import load_recipe

        load_recipe(path)
    if "d2dmoe" in sections:
        from upcycle.d2dmoe import load_recipe

        load_recipe(path)
    if "train" in sections:
        load_train_config(path)
    if "convert" in sections:
        load_convert_config(path)


def test_there_are_recipes():
    assert RECIPES


def test_jetpack_recipe_is_what_the_benchmark_runs():
    from upcycle.bench import jetpack

    path = Path(__file__).parent.parent / "recipes" / "jetpack_mnist5k.yaml"
    train = load_train_config(path)
    expected = load_train_config({**jetpack.FULL.finetune, "data": "mnist5k"})
    ignored = {"eval_every", "log_every"}  # the benchmark sets them per dataset
    assert {k: v for k, v in train.model_dump().items() if k not in ignored} == {
        k: v for k, v in expected.model_dump().items() if k not in ignored
    }
    convert = load_convert_config(path)
    assert convert.options["calibration_images"] == jetpack.FULL.calibration_images


def test_d2dmoe_recipe_is_what_the_benchmark_runs():
    from upcycle.bench import d2dmoe
    from upcycle.d2dmoe import load_recipe

    shipped = load_recipe(Path(__file__).parent.parent / "recipes" / "d2dmoe_vit_fashion_mnist.yaml")
    bench = load_recipe({**d2dmoe.FULL.vit_recipe, "attention": d2dmoe.FULL.vit_attention})
    assert shipped == bench


def test_bam_recipe_is_what_the_benchmark_runs():
    from upcycle.bam import load_recipe
    from upcycle.bench import bam

    shipped = load_recipe(Path(__file__).parent.parent / "recipes" / "bam_lm_tiny_text.yaml")
    assert shipped == load_recipe(bam.FULL.recipe)


PIPELINES = {  # the list: one recipe per paper pipeline, each runnable with `upcycle run`
    "jetpack_mnist5k.yaml": "convert", "jetpack_convnext_mnist5k.yaml": "convert",
    "d2dmoe_vit_fashion_mnist.yaml": "d2dmoe", "moefication_minilm.yaml": "d2dmoe", "btx_lm_tiny_text.yaml": "bam",
    "bam_expert_kv_lm_tiny_text.yaml": "bam", "bam_shared_kv_lm_tiny_text.yaml": "bam",
    "sparse_upcycling_smollm2.yaml": "convert",
}  # fmt: skip


@pytest.mark.parametrize("name", PIPELINES)
def test_every_paper_pipeline_has_a_runnable_recipe(name):
    from upcycle.run import load_run_recipe

    run, recipe = load_run_recipe(Path(__file__).parent.parent / "recipes" / name)
    assert PIPELINES[name] in recipe and run.source
