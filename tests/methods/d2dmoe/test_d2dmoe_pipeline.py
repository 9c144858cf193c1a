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


def test_recipe_reads_the_d2dmoe_section_of_a_yaml_file(tmp_path):
    """A YAML holding several pipelines' recipes: the d2dmoe section is the recipe (the file itself is not)."""
    path = tmp_path / "recipes.yaml"
    path.write_text(json.dumps({"d2dmoe": TINY_RECIPE, "other": {"data": "elsewhere"}}))  # JSON is YAML
    assert load_recipe(path) == load_recipe(TINY_RECIPE)
    assert load_recipe(str(path)).num_experts == 4


def test_router_stage_fits_only_the_routers_on_the_router_fit_loss_at_weight_one():
    """Whatever the routers recipe says about the losses, the stage trains the frozen backbone's routers on the
    router-fit loss alone, weighted 1; other aux settings pass through."""
    aux = {"router_fit": 5.0, "z_loss": 1.0, "sparsity": 0.3, "sparsity_ramp": 0.25}
    recipe = load_recipe({**TINY_RECIPE, "routers": {"steps": 4, "aux": aux}})
    config = recipe.router_config()
    assert (config.aux.router_fit, config.aux.sparsity, config.aux.load_balancing, config.aux.z_loss) == (1, 0, 0, 0)
    assert config.aux.sparsity_ramp == 0.25
    assert config.freeze == "all_but_routers" and (config.data, config.seed) == ("digits", 0)


def test_stage_fingerprints_name_each_stage_and_the_recipe_fields_it_depends_on():
    recipe = load_recipe(TINY_RECIPE)
    prints = pipeline.stage_fingerprints(recipe)
    assert list(prints) == ["0-attention", "1-sparsify", "2-d2dmoe", "3-d2dmoe-routers", "2-moefication",
                            "3-moefication-routers"]  # fmt: skip
    stage = {"steps": 3, "batch_size": 8, "lr": 1e-3, "sparsity": 0.01, "hidden_ratio": 0.5}  # the defaults filled in
    attention = {"data": "digits", "seed": 0, "attention": stage}
    assert prints["0-attention"] == attention
    sparsify = {**attention, "sparsify": json.loads(recipe.sparsify_config().model_dump_json())}
    assert prints["1-sparsify"] == sparsify
    split = {**sparsify, "method": "d2dmoe", "num_experts": 4, "partition": "kmeans", "router_hidden": 128}
    moefication = {**split, "method": "moefication", "router_activation": "tanh", "router_targets": "batch_max"}
    assert prints["2-d2dmoe"] == split and prints["2-moefication"] == moefication  # its router options: its alone
    routers = json.loads(recipe.router_config().model_dump_json())
    assert prints["3-d2dmoe-routers"] == {**split, "routers": routers}
    assert prints["3-moefication-routers"] == {**moefication, "routers": routers}
    relu = pipeline.stage_fingerprints(load_recipe({**TINY_RECIPE, "moefication_activation": "relu"}))
    assert relu["2-moefication"]["router_activation"] == "relu" and relu["2-d2dmoe"] == split
    # stage.json is compared after a JSON round trip: the training recipes' tuples (AdamW betas) must be lists
    assert prints["1-sparsify"]["sparsify"]["betas"] == [0.9, 0.999]
    assert prints["3-d2dmoe-routers"]["routers"]["betas"] == [0.9, 0.999]

    one = pipeline.stage_fingerprints(recipe, "moefication")  # one method: the shared stages and its own
    assert one == {name: prints[name] for name in ("0-attention", "1-sparsify", "2-moefication",
                                                    "3-moefication-routers")}  # fmt: skip
    without = pipeline.stage_fingerprints(load_recipe({**TINY_RECIPE, "attention": None}))
    assert without["0-attention"] == {"data": "digits", "seed": 0, "attention": None}


def test_attention_stage_distils_with_the_recipe_s_settings_and_writes_its_report(tmp_path, monkeypatch):
    """Replacement, distillation and saving stubbed: what the stage passes them and what it writes."""
    import upcycle.methods.d2dmoe as package
    from upcycle.methods.d2dmoe import distill

    calls, saved = {}, []
    report = {"blocks.0.attn.qkv": 0.25, "blocks.1.attn.proj": 0.5}

    def replace(model, hidden_ratio, generator):
        calls["replace"] = (model, hidden_ratio, generator.initial_seed())

    def distil(model, dense, data, steps, batch_size, lr, sparsity, *, seed, progress):
        calls["distil"] = (model, dense, data, steps, batch_size, lr, sparsity, seed, progress)
        return report

    monkeypatch.setattr(package, "replace_attention_projections", replace)
    monkeypatch.setattr(distill, "distill_attention_projections", distil)
    monkeypatch.setattr(pipeline, "save_stage", lambda model, out: saved.append((model, out)))
    attention = {"steps": 5, "batch_size": 6, "lr": 0.002, "sparsity": 0.03, "hidden_ratio": 0.25}
    recipe = load_recipe({**TINY_RECIPE, "seed": 3, "attention": attention})
    dense, out = tiny_vit(), tmp_path / "run" / "0-attention"
    model = pipeline.attention_stage(dense, recipe, out, progress=True)  # the folder made, its parents too

    assert model is not dense and calls["replace"] == (model, 0.25, 3)  # a copy, seeded by the recipe
    assert calls["distil"] == (model, dense, "digits", 5, 6, 0.002, 0.03, 3, True)
    assert (out / "distillation.json").read_text() == json.dumps(report, indent=2) + "\n"
    assert saved == [(model, out)]
    pipeline.attention_stage(dense, recipe, out, progress=False)  # an existing folder is reused
    assert calls["distil"][-1] is False


@pytest.fixture
def trained(monkeypatch):
    """train() stubbed: each call's model, config, folder, resume and progress; it freezes the model as the router
    stage's training leaves it (all but the routers)."""
    import importlib

    calls = []

    def train(model, config, out, *, resume, progress):
        calls.append((model, config, out, resume, progress))
        for param in model.parameters():
            param.requires_grad_(False)

    monkeypatch.setattr(importlib.import_module("upcycle.train"), "train", train)
    return calls


def test_sparsify_stage_trains_a_relu_copy_and_writes_its_activation_sparsity(tmp_path, monkeypatch, trained):
    held_out, measured = [], []
    sparsity = {"blocks.0.mlp": 0.75, "blocks.1.mlp": 0.25, "mean": 0.5}

    class FakeHeldOut:
        def __init__(self, model, data, split, *, examples, seq_len):
            held_out.append((model, data, split, examples, seq_len))

        def batches(self):
            return "the validation batches"

    def activation_sparsity(model, batches):
        measured.append((model, batches))
        return sparsity

    monkeypatch.setattr(pipeline, "HeldOut", FakeHeldOut)
    monkeypatch.setattr(pipeline, "activation_sparsity", activation_sparsity)
    recipe = load_recipe(TINY_RECIPE)
    dense, out = tiny_vit(), tmp_path / "1-sparsify"
    out.mkdir()  # made by cached_stage
    model = pipeline.sparsify_stage(dense, recipe, out, progress=True)

    assert model is not dense and all(type(block.mlp.act).__name__ == "ReLU" for block in model.blocks)
    assert all(type(block.mlp.act).__name__ == "GELU" for block in dense.blocks)  # the input is left as it was
    assert trained == [(model, recipe.sparsify_config(), out, False, True)]  # nothing to resume yet
    seq_len = recipe.sparsify_config().seq_len
    assert seq_len is not None and held_out == [(model, "digits", "val", 512, seq_len)]
    assert measured == [(model, "the validation batches")]
    assert (out / "activation_sparsity.json").read_text() == json.dumps(sparsity, indent=2) + "\n"
    (out / "checkpoints").mkdir()  # an interrupted run left checkpoints: training resumes from them
    pipeline.sparsify_stage(dense, recipe, out, progress=False)
    assert trained[-1][3:] == (True, False)


def test_split_stage_converts_with_the_recipe_s_experts_partition_and_router(tmp_path, monkeypatch):
    import importlib

    calls, saved = [], []
    moe = torch.nn.Identity()

    def convert(model, method, **options):
        calls.append((model, method, options))
        return moe

    monkeypatch.setattr(
        importlib.import_module("upcycle.convert"), "convert", convert
    )  # the package exports the function
    monkeypatch.setattr(pipeline, "save_stage", lambda model, out: saved.append((model, out)))
    recipe = load_recipe({**TINY_RECIPE, "partition": "random", "router_hidden": 16, "seed": 2,
                          "moefication_activation": "relu", "moefication_targets": "token_max"})  # fmt: skip
    sparse = tiny_vit()
    assert pipeline.split_stage(sparse, recipe, "moefication", tmp_path) is moe
    # every FFN, one expert per token until the sweep sets τ / k, the sorted backend, no progress bar of its own
    options = {"num_experts": 4, "top_k": 1, "layers": "all", "seed": 2, "backend": "sorted", "progress": False,
               "partition": "random", "router_hidden": 16}  # fmt: skip
    mine = {"router_activation": "relu", "router_targets": "token_max"}  # MoEfication's router options
    assert calls == [(sparse, "moefication", {**options, **mine})]
    assert pipeline.split_stage(sparse, recipe, "d2dmoe", tmp_path) is moe
    assert calls[-1] == (sparse, "d2dmoe", options)  # D2DMoE's router takes none of them
    assert saved == [(moe, tmp_path)] * 2


def test_router_stage_trains_a_copy_and_returns_it_whole(tmp_path, trained):
    recipe = load_recipe(TINY_RECIPE)
    moe = tiny_vit()
    fitted = pipeline.router_stage(moe, recipe, tmp_path, progress=True)
    assert fitted is not moe and trained == [(fitted, recipe.router_config(), tmp_path, False, True)]
    assert all(param.requires_grad for param in fitted.parameters())  # unfrozen after training
    (tmp_path / "checkpoints").mkdir()
    pipeline.router_stage(moe, recipe, tmp_path, progress=False)
    assert trained[-1][3:] == (True, False)


@pytest.mark.parametrize("attention", [True, False], ids=["attention", "no-attention"])
def test_run_stages_chains_the_stages_and_shows_progress_by_default(tmp_path, monkeypatch, attention):
    """Each stage stubbed: which model, recipe, folder and progress flag it gets; the stage.json it is cached under."""
    import upcycle

    calls = []

    def stub(name, result):
        def build(*args):
            calls.append((name, *args))
            return result

        return build

    dense, attended, sparse = tiny_vit(), tiny_vit(), tiny_vit()
    split = {m: upcycle.convert(tiny_vit(), m, num_experts=4, progress=False) for m in ("d2dmoe", "moefication")}
    fitted = {m: upcycle.convert(tiny_vit(), m, num_experts=4, backend="eager", progress=False) for m in split}
    monkeypatch.setattr(pipeline, "attention_stage", stub("attention", attended))
    monkeypatch.setattr(pipeline, "sparsify_stage", stub("sparsify", sparse))
    monkeypatch.setattr(
        pipeline, "split_stage", lambda model, recipe, m, out: stub("split", split[m])(model, recipe, m, out)
    )
    monkeypatch.setattr(
        pipeline,
        "router_stage",
        lambda model, recipe, out, progress: stub(
            "routers", fitted["d2dmoe" if model is split["d2dmoe"] else "moefication"]
        )(model, recipe, out, progress),
    )
    recipe = load_recipe(TINY_RECIPE if attention else {**TINY_RECIPE, "attention": None})
    models = run_stages(dense, recipe, tmp_path)

    assert models == {"sparse": sparse, **fitted}
    first = [("attention", dense, recipe, tmp_path / "0-attention", True)] if attention else []
    assert calls == [*first, ("sparsify", attended if attention else dense, recipe, tmp_path / "1-sparsify", True),
                     ("split", sparse, recipe, "d2dmoe", tmp_path / "2-d2dmoe"),
                     ("routers", split["d2dmoe"], recipe, tmp_path / "3-d2dmoe-routers", True),
                     ("split", sparse, recipe, "moefication", tmp_path / "2-moefication"),
                     ("routers", split["moefication"], recipe, tmp_path / "3-moefication-routers", True)]  # fmt: skip
    prints = pipeline.stage_fingerprints(recipe)
    for name in [*prints][0 if attention else 1 :]:
        assert json.loads((tmp_path / name / "stage.json").read_text()) == prints[name], name
    for model in fitted.values():  # inference runs only the selected pairs
        assert {block.mlp.moe.experts.backend for block in model.blocks} == {"sorted"}


def test_sweep_methods_measures_every_point_against_the_dense_model(tmp_path, monkeypatch):
    """Held-out splits, MACs and the sweep stubbed with known numbers: what sweep_methods asks and reports."""
    built, costed, swept = [], [], []
    dense, sparse, d2d, moe = (torch.nn.Linear(1, 1) for _ in range(4))
    accuracy = {(dense, "val"): 0.9, (dense, "test"): 0.8, (sparse, "val"): 0.85, (sparse, "test"): 0.75}

    class FakeHeldOut:
        def __init__(self, model, data, split, examples, seq_len):
            built.append((model, data, split, examples, seq_len))
            self.split = split

        def metric(self, model):
            return accuracy[model, self.split]

    def macs(model, held_out, examples):
        costed.append((model, held_out.split, examples))
        return {dense: 400.0, sparse: 100.0}[model]

    def sweep(model, dense_macs, points, apply, held_out, mac_examples, desc):
        swept.append((model, dense_macs, points, apply, {s: h.split for s, h in held_out.items()}, mac_examples, desc))
        return [{"point": points[0], "flops_fraction": 0.5, "val": 0.1, "test": 0.2}]

    monkeypatch.setattr(pipeline, "HeldOut", FakeHeldOut)
    monkeypatch.setattr(pipeline, "macs_per_example", macs)
    monkeypatch.setattr(pipeline, "sweep", sweep)
    recipe = load_recipe(TINY_RECIPE)
    results = sweep_methods({"sparse": sparse, "d2dmoe": d2d, "moefication": moe}, dense, recipe, tmp_path)

    seq_len = recipe.sparsify_config().seq_len
    assert built == [(dense, "digits", "val", 100, seq_len), (dense, "digits", "test", 100, seq_len)]
    assert costed == [(dense, "val", 256), (sparse, "val", 256)]  # MACs on the first split, 256 examples
    assert results["dense"] == {"val": 0.9, "test": 0.8, "flops_fraction": 1.0}
    assert results["sparse"] == {"val": 0.85, "test": 0.75, "flops_fraction": 0.25}
    splits = {"val": "val", "test": "test"}
    assert swept == [(d2d, 400.0, [0.0, 0.5, 1.0], pipeline.set_tau, splits, 256, "d2dmoe sweep"),
                     (moe, 400.0, [1, 4], pipeline.set_top_k, splits, 256, "moefication sweep")]  # fmt: skip
    for method, first in (("d2dmoe", 0.0), ("moefication", 1)):
        rows = [{"point": first, "flops_fraction": 0.5, "val": 0.1, "test": 0.2}]
        assert results[method] == rows
        assert (tmp_path / f"sweep-{method}.json").read_text() == json.dumps(rows, indent=2) + "\n"


def test_a_sweep_is_kept_with_its_stage_and_reused_for_the_same_measurement(tmp_path, monkeypatch):
    """Sweeping is most of a rerun's time: the rows are kept in the model's stage folder with what they measured,
    reused when nothing changed and measured again when the points change."""
    swept = []

    class FakeHeldOut:
        def __init__(self, model, data, split, examples, seq_len):
            pass

        def metric(self, model):
            return 0.5

    def sweep(model, dense_macs, points, apply, held_out, mac_examples, desc):
        swept.append(desc)
        return [{"point": points[0], "flops_fraction": 0.5, "val": len(swept), "test": 0.2}]

    monkeypatch.setattr(pipeline, "HeldOut", FakeHeldOut)
    monkeypatch.setattr(pipeline, "macs_per_example", lambda model, held_out, examples: 1.0)
    monkeypatch.setattr(pipeline, "sweep", sweep)
    models = {name: torch.nn.Linear(1, 1) for name in ("sparse", "d2dmoe", "moefication")}
    for method in ("d2dmoe", "moefication"):
        (tmp_path / f"3-{method}-routers").mkdir()
    first = sweep_methods(models, models["sparse"], load_recipe(TINY_RECIPE), tmp_path)
    again = sweep_methods(models, models["sparse"], load_recipe(TINY_RECIPE), tmp_path)
    assert swept == ["d2dmoe sweep", "moefication sweep"] and again == first
    other_taus = sweep_methods(models, models["sparse"], load_recipe({**TINY_RECIPE, "taus": [0.0, 0.25]}), tmp_path)
    assert swept[2:] == ["d2dmoe sweep"] and other_taus["moefication"] == first["moefication"]
    assert other_taus["d2dmoe"] != first["d2dmoe"]
    zero_runs_all = sweep_methods(
        models, models["sparse"], load_recipe({**TINY_RECIPE, "zero_runs_all": True}), tmp_path
    )
    assert swept[3:] == ["d2dmoe sweep"] and zero_runs_all["moefication"] == first["moefication"]


def test_the_sweep_sets_the_recipes_zero_prediction_rule_on_every_dynamic_k_router():
    import upcycle
    from upcycle.layers import moe_layers
    from upcycle.methods.d2dmoe.pipeline import set_zero_runs_all

    model = upcycle.convert(tiny_vit(), "d2dmoe", num_experts=4, layers="all", progress=False)
    routers = [layer.router for _, layer in moe_layers(model)]
    assert routers and not any(router.zero_runs_all for router in routers)
    set_zero_runs_all(model, True)
    assert all(router.zero_runs_all and router.spec()["zero_runs_all"] for router in routers)


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


def test_a_loaded_language_model_swapped_to_relu_saves_as_a_relu_model(tmp_path):
    """A loaded Hugging Face model carries a record of its SiLU config: the swap must refresh it before saving."""
    import upcycle
    from tests.models.helpers import tiny_lm

    upcycle.save(tiny_lm(), tmp_path / "silu")
    model = upcycle.load(tmp_path / "silu")
    swap_to_relu(model)
    upcycle.save(model, tmp_path / "relu")
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(upcycle.load(tmp_path / "relu")(input_ids=ids).logits, model(input_ids=ids).logits)
