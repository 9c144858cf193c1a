"""The D2DMoE pipeline end to end on a tiny ViT and real images: stages, resumption, the τ / k sweeps; what the
entry point adds on top (the summary, its operating points, the files it writes, its refusals) on hand-made sweeps."""

import json
from pathlib import Path

import pytest
import torch

from upcycle.eval.held_out import HeldOut
from upcycle.methods.d2dmoe import load_recipe, pipeline, plots, run_stages, sweep_methods
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


def test_run_d2dmoe_summarises_the_sweeps_at_one_point_below_dense_on_validation(tmp_path, monkeypatch):
    """The stages and sweeps are stubbed with hand-made results: what run_d2dmoe adds is checked on known numbers."""
    results = {
        "dense": {"val": 0.9, "test": 0.5, "flops_fraction": 1.0},
        "sparse": {"val": 0.89, "test": 0.49, "flops_fraction": 0.97},
        "d2dmoe": [{"point": 0.0, "flops_fraction": 1.05, "val": 0.90, "test": 0.50},
                   {"point": 0.5, "flops_fraction": 0.60, "val": 0.895, "test": 0.10},
                   {"point": 1.0, "flops_fraction": 0.20, "val": 0.50, "test": 0.90}],
        "moefication": [{"point": 1, "flops_fraction": 0.3, "val": 0.7, "test": 0.9},
                        {"point": 4, "flops_fraction": 1.0, "val": 0.85, "test": 0.9}],  # never within 1 point
    }  # fmt: skip
    models = {"sparse": object(), "d2dmoe": object(), "moefication": object()}
    calls, drawn = {}, []

    def stages(dense, recipe, out, progress=True, redo=False):
        calls["stages"] = (dense, recipe, out, progress, redo)
        Path(out).mkdir(parents=True, exist_ok=True)  # the stages make the run's folder
        return models

    def sweeps(got_models, dense, recipe, out):
        calls["sweeps"] = (got_models, dense, recipe, out)
        return results

    real_plot = plots.plot_curves

    def plot(panels, path, split="test"):
        drawn.append((panels, split))
        return real_plot(panels, path, split)

    monkeypatch.setattr(pipeline, "run_stages", stages)
    monkeypatch.setattr(pipeline, "sweep_methods", sweeps)
    monkeypatch.setattr(plots, "plot_curves", plot)
    dense, out = tiny_vit(), tmp_path / "run"
    summary = pipeline.run_d2dmoe(dense, TINY_RECIPE, str(out), progress=False, redo=True)

    recipe = load_recipe(TINY_RECIPE)
    assert calls["stages"] == (dense, recipe, out, False, True)
    assert calls["sweeps"][0] is models and calls["sweeps"][1:] == (dense, recipe, out)
    assert summary["recipe"] == recipe.model_dump(mode="json")
    for key in ("dense", "sparse", "d2dmoe", "moefication"):
        assert summary[key] == results[key], key
    # the cheapest point within 1 point of the dense model's validation accuracy, chosen on validation
    assert (summary["d2dmoe.flops_fraction_at_1pt_drop"], summary["d2dmoe.point_at_1pt_drop"]) == (0.6, 0.5)
    assert (summary["moefication.flops_fraction_at_1pt_drop"], summary["moefication.point_at_1pt_drop"]) == (None, None)

    written = json.loads((out / "summary.json").read_text())
    assert written == {key: value for key, value in summary.items() if key != "curves_png"}
    assert summary["curves_png"] == str(out / "curves.png")
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(path.name for path in out.iterdir()) == ["curves.png", "summary.json"]  # no temporary left
    panel = {"dense": results["dense"], "variants": {m: results[m] for m in ("d2dmoe", "moefication")}}
    assert drawn == [({"VisionTransformer": panel}, "val")]


def test_run_d2dmoe_shows_progress_by_default_and_writes_its_summary_as_indented_json(tmp_path, monkeypatch):
    """The summary returned is the file's content: the recipe dumped as JSON (a tuple in a training recipe becomes a
    list), written two-space indented with a final newline; stages and sweeps stubbed as above."""
    results = {"dense": {"val": 0.9, "test": 0.5, "flops_fraction": 1.0},
               "d2dmoe": [{"point": 0.5, "flops_fraction": 0.6, "val": 0.895, "test": 0.4}]}  # fmt: skip
    calls = []

    def stages(dense, recipe, out, progress, redo):
        calls.append((progress, redo))
        Path(out).mkdir(parents=True, exist_ok=True)
        return {}

    monkeypatch.setattr(pipeline, "run_stages", stages)
    monkeypatch.setattr(pipeline, "sweep_methods", lambda models, dense, recipe, out: results)
    monkeypatch.setattr(plots, "plot_curves", lambda panels, path, split: path)
    recipe = {**TINY_RECIPE, "methods": ["d2dmoe"], "sparsify": {**TINY_RECIPE["sparsify"], "betas": (0.9, 0.95)}}
    out = tmp_path / "run"
    summary = pipeline.run_d2dmoe(tiny_vit(), recipe, out)

    assert calls == [(True, False)]  # a progress bar unless asked otherwise, finished stages kept
    assert summary["recipe"]["sparsify"]["betas"] == [0.9, 0.95]
    assert summary["recipe"] == load_recipe(recipe).model_dump(mode="json")
    written = {key: value for key, value in summary.items() if key != "curves_png"}
    assert (out / "summary.json").read_text() == json.dumps(written, indent=2) + "\n"
    assert json.loads((out / "summary.json").read_text()) == written


def test_run_d2dmoe_refuses_a_bad_recipe_or_another_recipe_s_stages_before_any_work(tmp_path):
    dense = tiny_vit()
    with pytest.raises(ValueError, match="taus"):
        pipeline.run_d2dmoe(dense, {**TINY_RECIPE, "taus": [1.5]}, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()

    out = tmp_path / "run"
    other = pipeline.stage_fingerprints(load_recipe({**TINY_RECIPE, "seed": 1}))["0-attention"]
    (out / "0-attention").mkdir(parents=True)
    (out / "0-attention" / "stage.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"changed: seed\)"):
        pipeline.run_d2dmoe(dense, TINY_RECIPE, out, progress=False)
    assert sorted(path.name for path in out.iterdir()) == ["0-attention"]  # nothing built, nothing summarised
    assert [path.name for path in (out / "0-attention").iterdir()] == ["stage.json"]
