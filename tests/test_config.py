"""Recipes: YAML in, overrides on top, method options validated by the method, errors that say what to change."""

import pytest
import yaml

from upcycle.cli import _recipe_overrides, build_parser
from upcycle.config import ConvertConfig, load_convert_config, to_yaml


def test_defaults_and_resolved_method_options():
    config = load_convert_config(method="sparse_upcycling")
    assert (config.num_experts, config.top_k, config.layers, config.router.type) == (8, 2, "all", "topk")
    assert config.options == {"noise_std": 0.0, "granularity": 1, "weight_scaling": "auto"}


def test_yaml_with_overrides(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"convert": {"method": "neuron_split", "num_experts": 4, "top_k": 4,
                                                "options": {"partition": "random"}}}))  # fmt: skip
    config = load_convert_config(path, top_k=2, router_init="zero", kmeans_iterations=3)
    assert (config.method, config.num_experts, config.top_k, config.router.init) == ("neuron_split", 4, 2, "zero")
    assert config.options == {"partition": "random", "kmeans_iterations": 3}
    assert load_convert_config(yaml.safe_load(to_yaml(config))["convert"]) == config  # the saved recipe reloads


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"method": "magic"}, "unknown recycling method 'magic'; choose one of .*d2dmoe, "),
        ({"num_experts": 0}, "num_experts: Input should be greater than or equal to 1"),
        ({"granularity": 0}, "granularity"),
        ({"partition": "kmeans"}, "partition"),  # an option of another method
        ({"layers": [1, 1]}, "indices must be distinct"),
        ({"layers": "some"}, "layers"),
        ({"backend": "turbo"}, "backend 'turbo' is unknown"),
        ({"num_experts": 2, "top_k": 3}, "top_k=3 is larger than the 2 experts per layer"),
        ({"router_capacity_factor": -1.0}, "capacity_factor"),
    ],
)
def test_bad_recipes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_convert_config(**kwargs)


def test_granularity_counts_in_the_top_k_check():
    config = load_convert_config(num_experts=2, top_k=4, granularity=2)  # 2 copies × 2 shards = 4 experts
    assert config.top_k == 4
    with pytest.raises(ValueError, match="top_k=5 is larger than the 4 experts"):
        load_convert_config(num_experts=2, top_k=5, granularity=2)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_convert_config(tmp_path / "nope.yaml")


def test_cli_flags_map_onto_the_recipe():
    args = build_parser().parse_args(
        [
            "convert",
            "timm:x",
            "--out",
            "o",
            "--experts",
            "4",
            "--top-k",
            "1",
            "--layers",
            "0,2",
            "--no-renormalize",
            "--set",
            "granularity=2",
            "--set",
            "weight_scaling=paper",
        ]
    )
    config = load_convert_config(None, **_recipe_overrides(args))
    assert (config.num_experts, config.top_k, config.layers, config.router.renormalize) == (4, 1, [0, 2], False)
    assert config.options["granularity"] == 2 and config.options["weight_scaling"] == "paper"
    assert isinstance(config, ConvertConfig)


def test_training_data_options_are_checked_against_the_dataset():
    from upcycle.config import load_train_config

    weights = {"shakespeare": 0.9, "python_code": 0.05, "python_docs": 0.05}
    assert load_train_config(data="text_mixture", steps=1, data_options={"weights": weights}).data_options == {
        "weights": weights
    }
    with pytest.raises(ValueError, match="has no option wieghts"):
        load_train_config(data="text_mixture", steps=1, data_options={"wieghts": weights})
    with pytest.raises(ValueError, match="set by the training run"):
        load_train_config(data="shakespeare", steps=1, data_options={"seq_len": 64})


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads ``3e-3`` as a string, which strict recipe types would refuse; recipes read it as
    YAML 1.2 does. Quoted, it stays a string (and is refused where a number belongs)."""
    from upcycle.cli import _key_values
    from upcycle.errors import parse_yaml, read_yaml

    assert parse_yaml("3e-3") == 0.003 and parse_yaml("-2E+3") == -2000.0 and parse_yaml("1.5e2") == 150.0
    assert parse_yaml('"3e-3"') == "3e-3" and parse_yaml("abc") == "abc" and parse_yaml("7") == 7
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: 3e-4\n")
    assert read_yaml(recipe) == {"train": {"lr": 0.0003}}
    assert _key_values(["lr=3e-3"]) == {"lr": 0.003}
