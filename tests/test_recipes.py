"""Every YAML recipe shipped with the package validates against the config models and is found by name."""

import pytest
import yaml

from upcycle.config import load_convert_config, load_train_config
from upcycle.recipes import list_recipes

RECIPES = sorted(list_recipes().values())


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
        from upcycle.methods.bam import load_recipe

        load_recipe(path)
    if "d2dmoe" in sections:
        from upcycle.methods.d2dmoe import load_recipe

        load_recipe(path)
    if "train" in sections:
        load_train_config(path)
    if "convert" in sections:
        load_convert_config(path)


def test_there_are_recipes():
    assert RECIPES


def test_jetpack_recipe_is_what_the_benchmark_runs():
    from upcycle.methods.jetpack import bench as jetpack

    path = list_recipes()["jetpack_mnist5k"]
    train = load_train_config(path)
    expected = load_train_config({**jetpack.FULL.finetune, "data": "mnist5k"})
    ignored = {"eval_every", "log_every"}  # the benchmark sets them per dataset
    assert {k: v for k, v in train.model_dump().items() if k not in ignored} == {
        k: v for k, v in expected.model_dump().items() if k not in ignored
    }
    convert = load_convert_config(path)
    assert convert.options["calibration_images"] == jetpack.FULL.calibration_images


def test_d2dmoe_recipe_is_what_the_benchmark_runs():
    from upcycle.methods.d2dmoe import bench as d2dmoe
    from upcycle.methods.d2dmoe import load_recipe

    shipped = load_recipe(list_recipes()["d2dmoe_vit_fashion_mnist"])
    bench = load_recipe({**d2dmoe.FULL.vit_recipe, "attention": d2dmoe.FULL.vit_attention})
    assert shipped == bench


def test_bam_recipe_is_what_the_benchmark_runs():
    from upcycle.methods.bam import bench as bam
    from upcycle.methods.bam import load_recipe

    assert load_recipe(list_recipes()["bam_lm_tiny_text"]) == load_recipe(bam.TINY.recipe)
    assert load_recipe(list_recipes()["bam_smollm2_three_domains"]) == load_recipe(bam.FULL.recipe)


PIPELINES = {  # the list: one recipe per paper pipeline, each runnable with `upcycle run`
    "jetpack_mnist5k": "convert", "jetpack_convnext_mnist5k": "convert",
    "d2dmoe_vit_fashion_mnist": "d2dmoe", "moefication_minilm": "d2dmoe", "btx_lm_tiny_text": "bam",
    "bam_expert_kv_lm_tiny_text": "bam", "bam_shared_kv_lm_tiny_text": "bam",
    "sparse_upcycling_smollm2": "convert", "drop_upcycling_smollm2": "convert",
}  # fmt: skip


@pytest.mark.parametrize("name", PIPELINES)
def test_every_paper_pipeline_has_a_runnable_recipe(name):
    from upcycle.run import load_run_recipe

    run, recipe = load_run_recipe(name)
    assert PIPELINES[name] in recipe and run.source


def test_a_recipe_is_found_by_name_or_path_and_a_wrong_name_lists_the_built_in_ones(tmp_path):
    from upcycle.errors import UserError
    from upcycle.recipes import recipe_file

    builtin = recipe_file("jetpack_mnist5k")
    assert builtin.parent.parent.name == "jetpack"  # in the method's home
    assert recipe_file("jetpack_mnist5k.yaml") == builtin
    own = tmp_path / "jetpack_mnist5k.yaml"
    own.write_text("train: {}\n")
    assert recipe_file(own) == own  # a file the user names wins over a built-in of the same name
    with pytest.raises(FileNotFoundError, match=r"not a built-in recipe; built-in: .*moefication_minilm"):
        recipe_file("jetpack_mnist")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        recipe_file(tmp_path / "missing.yaml")  # a path is never looked up among the built-in names
    with pytest.raises(UserError, match="is not a file"):
        recipe_file(tmp_path)


def test_every_method_recipe_lives_in_its_method_home():
    homes = {"jetpack": "jetpack", "d2dmoe": "d2dmoe", "moefication": "d2dmoe", "bam": "bam", "btx": "bam",
             "sparse_upcycling": "sparse_upcycling", "drop_upcycling": "drop_upcycling",
             "shared_finegrained": "shared_finegrained", "cmoe": "cmoe",
             "pretrain": "recipes"}  # fmt: skip
    for name, path in list_recipes().items():
        home = next(home for prefix, home in homes.items() if name.startswith(prefix))
        assert home in path.parts[-3:-1], (name, path)
