"""The D2DMoE pipeline end to end on a tiny ViT and real images: stages, resumption, the τ / k sweeps."""

import json

import pytest
import torch

from upcycle.eval.held_out import HeldOut
from upcycle.methods.d2dmoe import load_recipe, run_stages, sweep_methods
from upcycle.methods.d2dmoe.relu import activation_sparsity, swap_to_relu
from upcycle.pretrain import build_dense

TINY_RECIPE = {
    "data": "digits", "num_experts": 4, "attention": {"steps": 3, "batch_size": 8},
    "sparsify": {"steps": 4, "batch_size": 16, "log_every": 2},
    "routers": {"steps": 4, "batch_size": 16, "log_every": 2},
    "taus": [0.0, 0.5, 1.0], "top_ks": [1, 4], "eval_examples": 100,
}  # fmt: skip


def tiny_vit():
    return build_dense("vit_xxs", num_classes=10, seed=0, embed_dim=32, depth=2).eval()


@pytest.mark.parametrize("saved_before", [False, True], ids=["fresh", "loaded"])
def test_swap_to_relu_changes_every_ffn_and_survives_save_load(tmp_path, saved_before):
    import upcycle

    model = tiny_vit()
    if saved_before:  # a loaded model carries a record of its GELU skeleton, which the swap must update
        upcycle.save(model, tmp_path / "gelu")
        model = upcycle.load(tmp_path / "gelu")
    assert swap_to_relu(model) == 2
    assert all(type(block.mlp.act).__name__ == "ReLU" for block in model.blocks)
    upcycle.save(model, tmp_path / "m")
    loaded = upcycle.load(tmp_path / "m")
    assert all(type(block.mlp.act).__name__ == "ReLU" for block in loaded.blocks)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
    sparsity = activation_sparsity(model, HeldOut(model, "digits", "val", examples=64).batches())
    assert set(sparsity) == {"blocks.0.mlp", "blocks.1.mlp", "mean"} and 0 < sparsity["mean"] < 1


def test_pipeline_runs_resumes_and_sweeps(tmp_path):
    dense = tiny_vit()
    recipe = load_recipe(TINY_RECIPE)
    models = run_stages(dense, recipe, tmp_path, progress=False)
    stages = ("0-attention", "1-sparsify", "2-d2dmoe", "3-d2dmoe-routers", "2-moefication", "3-moefication-routers")
    for stage in stages:
        assert (tmp_path / stage / "model" / "config.json").is_file(), stage
    stamp = (tmp_path / "3-d2dmoe-routers" / "model" / "config.json").stat().st_mtime_ns
    again = run_stages(dense, recipe, tmp_path, progress=False)  # every stage loads: nothing is redone
    assert (tmp_path / "3-d2dmoe-routers" / "model" / "config.json").stat().st_mtime_ns == stamp
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(again["d2dmoe"].eval()(x), models["d2dmoe"].eval()(x))

    results = sweep_methods(models, dense, recipe, tmp_path, mac_examples=64)
    d2d = results["d2dmoe"]
    assert [row["point"] for row in d2d] == [0.0, 0.5, 1.0]
    # τ = 0 runs every expert: exactly the sparse ReLU model's accuracy, at a little more than its cost (routers)
    assert d2d[0]["val"] == pytest.approx(results["sparse"]["val"])
    assert d2d[0]["flops_fraction"] > results["sparse"]["flops_fraction"]
    assert d2d[0]["flops_fraction"] > d2d[1]["flops_fraction"] > d2d[2]["flops_fraction"]
    moe = results["moefication"]
    assert moe[-1]["val"] == pytest.approx(results["sparse"]["val"])  # k = E: every expert
    assert moe[0]["flops_fraction"] < moe[-1]["flops_fraction"]
    assert json.loads((tmp_path / "sweep-d2dmoe.json").read_text()) == d2d

    # a changed recipe never silently reuses a stage: it names the change, or rebuilds only what depends on it
    changed = load_recipe({**TINY_RECIPE, "router_hidden": 8, "methods": ["d2dmoe"]})
    with pytest.raises(ValueError, match="router_hidden"):
        run_stages(dense, changed, tmp_path, progress=False)
    sparse_stamp = (tmp_path / "1-sparsify" / "model" / "config.json").stat().st_mtime_ns
    rebuilt = run_stages(dense, changed, tmp_path, progress=False, redo=True)
    assert (tmp_path / "1-sparsify" / "model" / "config.json").stat().st_mtime_ns == sparse_stamp
    assert rebuilt["d2dmoe"].blocks[0].mlp.moe.router.hidden == 8


def test_recipe_errors_say_what_to_change():
    with pytest.raises(ValueError, match="taus"):
        load_recipe({**TINY_RECIPE, "taus": [1.5]})
    with pytest.raises(ValueError, match="sparsity must be > 0"):
        load_recipe({**TINY_RECIPE, "sparsify": {"steps": 1, "aux": {"sparsity": 0}}})
    with pytest.raises(ValueError, match="top_ks"):
        load_recipe({**TINY_RECIPE, "top_ks": [5]})
