"""The D2DMoE / MoEfication points that changed behaviour (docs/methods/d2dmoe.md, "Paper, released code and ours"):
the router stage runs the frozen backbone in eval mode; the sparsity penalty adds the FFN mean and the projection
mean; MoEfication's router activation and target scaling are options the conversion honours and a saved model
keeps; a sweep measures each point after setting it, on a real model; the τ grids are dense below 0.05; the
benchmark evaluates on at least 1,000 examples and prints the paper's numbers next to ours."""

import copy

import pytest
import torch

import upcycle
from tests.conversion.tiny_models import build
from upcycle.adapters import find_adapter
from upcycle.adapters.timm_vit_projections import replace_attention_projections
from upcycle.eval.held_out import HeldOut
from upcycle.layers import moe_layers, set_tau
from upcycle.layers.experts import ExpertStatistics
from upcycle.layers.losses import hoyer_sparsity
from upcycle.methods.d2dmoe import bench, load_recipe, sweep
from upcycle.methods.d2dmoe.moefication_router import MoEficationRouter
from upcycle.recipes import recipe_file
from upcycle.run import load_run_recipe
from upcycle.sources import load_timm
from upcycle.train import train
from upcycle.train.sparsity import SparsityPenalty, activation_modules, site_group
from upcycle.train.stages import set_training_modes


def digits_vit(**options):
    return load_timm("vit_tiny_patch16_224", None, False, {"img_size": 8, "patch_size": 2, "in_chans": 1,
                     "embed_dim": 48, "depth": 2, "num_heads": 3, "num_classes": 10, **options})  # fmt: skip


# ---- router fitting: backbone in eval mode ------------------------------------------------------------------------
def test_router_stage_runs_the_frozen_backbone_in_eval_mode(tmp_path):
    moe = upcycle.convert(digits_vit(proj_drop_rate=0.5), "d2dmoe", num_experts=4, router_hidden=16, progress=False)
    seen = {"dropout": set(), "router": set()}
    for module in moe.modules():
        if isinstance(module, torch.nn.Dropout):
            module.register_forward_pre_hook(lambda m, args: seen["dropout"].add(m.training))
    for _, layer in moe_layers(moe):
        layer.router.register_forward_pre_hook(lambda m, args: seen["router"].add(m.training))
    config = {"data": "digits", "steps": 2, "batch_size": 16, "eval_every": 1, "eval_batches": 1, "lr": 1e-2,
              "freeze": "all_but_routers", "aux": {"router_fit": 1.0}}  # fmt: skip
    train(moe, config, tmp_path / "run", progress=False)
    assert seen["dropout"] == {False}  # no dropout while the routers learn, before or after a validation pass
    assert seen["router"] == {True, False}  # training forwards (every expert, fitted), validation forwards


def test_training_modes_only_change_for_the_router_stage():
    moe = upcycle.convert(build("vit"), "d2dmoe", num_experts=4, progress=False).eval()
    set_training_modes(moe, "none")
    assert all(module.training for module in moe.modules())
    set_training_modes(moe, "all_but_routers")
    routers = {id(layer.router) for _, layer in moe_layers(moe)} | {
        id(m) for _, layer in moe_layers(moe) for m in layer.router.modules()
    }
    assert all(module.training == (id(module) in routers) for module in moe.modules())


# ---- sparsity penalty: FFN mean + projection mean ------------------------------------------------------------------
def test_sparsity_penalty_adds_the_ffn_mean_and_the_projection_mean():
    model = replace_attention_projections(copy.deepcopy(build("vit")), 0.5, torch.Generator().manual_seed(1))
    adapter = find_adapter(model)
    seen = []
    for name, module in activation_modules(model, adapter).items():
        module.register_forward_hook(lambda m, i, output, name=name: seen.append((site_group(name), output)))
    grouped, pooled = SparsityPenalty(model, adapter, "hoyer"), SparsityPenalty(model, adapter, "hoyer", "pooled")
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    ffn = torch.stack([hoyer_sparsity(a) for g, a in seen if g == "ffn"])
    attention = torch.stack([hoyer_sparsity(a) for g, a in seen if g == "attention"])
    assert (len(ffn), len(attention)) == (2, 8)  # two blocks: one FFN and four projection MLPs each
    per_group, pooled_value = grouped.take()[0].detach(), pooled.take()[0].detach()
    assert float(per_group) == pytest.approx(float(ffn.mean() + attention.mean()), rel=1e-5)
    assert float(pooled_value) == pytest.approx(float(torch.cat([ffn, attention]).mean()), rel=1e-5)
    with pytest.raises(ValueError, match="per_group or pooled"):
        SparsityPenalty(model, adapter, "hoyer", "sum")


def test_without_projections_both_means_are_one_mean():
    model = build("vit")
    adapter = find_adapter(model)
    grouped, pooled = SparsityPenalty(model, adapter, "l1"), SparsityPenalty(model, adapter, "l1", "pooled")
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert float(grouped.take()[0]) == pytest.approx(float(pooled.take()[0]))


def test_the_training_loop_takes_the_recipe_s_sparsity_mean(tmp_path, monkeypatch):
    made = []

    class Spy(SparsityPenalty):
        def __init__(self, *args):
            made.append(args[2:])
            super().__init__(*args)

    monkeypatch.setattr("upcycle.train.loop.SparsityPenalty", Spy)
    recipe = load_recipe({"data": "digits", "sparsify": {"steps": 1, "batch_size": 8, "eval_batches": 1,
                                                         "aux": {"sparsity_mean": "pooled"}}})  # fmt: skip
    train(digits_vit(), recipe.sparsify_config(), tmp_path / "run", progress=False)
    assert made == [("hoyer", "pooled")]
    assert load_recipe({"data": "digits"}).sparsify_config().aux.sparsity_mean == "per_group"  # the default
    with pytest.raises(ValueError, match="sparsity_mean"):
        load_recipe({"data": "digits", "sparsify": {"aux": {"sparsity_mean": "sum"}}})


# ---- MoEfication router: activation and targets ------------------------------------------------------------------
def test_moefication_targets_divide_by_the_batch_or_the_token_maximum():
    sums = torch.tensor([[1.0, 2.0], [4.0, 0.0]])  # [t, e]
    statistics = ExpertStatistics(output_norms=torch.zeros(2, 2), activation_sums=sums)
    batch = MoEficationRouter(8, 2, hidden=4, targets="batch_max").fit_targets(statistics)
    token = MoEficationRouter(8, 2, hidden=4, targets="token_max").fit_targets(statistics)
    torch.testing.assert_close(batch, torch.tensor([[0.25, 0.5], [1.0, 0.0]]))
    torch.testing.assert_close(token, torch.tensor([[0.5, 1.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="batch_max, token_max"):
        MoEficationRouter(8, 2, targets="global")
    with pytest.raises(ValueError, match="relu, tanh"):
        MoEficationRouter(8, 2, activation="gelu")


def test_moefication_router_activation_is_an_option_the_conversion_honours(tmp_path):
    dense = build("vit")
    inputs = find_adapter(dense).example_inputs(dense)
    options = {"num_experts": 4, "top_k": 2, "progress": False, "router_targets": "token_max"}
    converted = {a: upcycle.convert(dense, "moefication", router_activation=a, **options) for a in ("tanh", "relu")}
    tanh, relu = (next(iter(moe_layers(converted[a])))[1].router for a in ("tanh", "relu"))
    assert isinstance(tanh.mlp[1], torch.nn.Tanh) and isinstance(relu.mlp[1], torch.nn.ReLU)
    torch.testing.assert_close(tanh.mlp[0].weight, relu.mlp[0].weight)  # same draws: only the activation differs
    x = torch.randn(5, 48)
    assert not torch.allclose(tanh.predict(x), relu.predict(x))
    default = next(iter(moe_layers(upcycle.convert(dense, "moefication", num_experts=4, progress=False))))[1].router
    assert (default.activation, default.targets) == ("tanh", "batch_max")  # MoEfication's code by default
    upcycle.save(converted["tanh"], tmp_path / "moe")
    loaded = upcycle.load(tmp_path / "moe")
    router = next(iter(moe_layers(loaded)))[1].router
    assert (router.activation, router.targets) == ("tanh", "token_max")
    torch.testing.assert_close(loaded.eval()(inputs["x"]), converted["tanh"].eval()(inputs["x"]))


def test_d2dmoe_keeps_its_relu_router():
    moe = upcycle.convert(build("vit"), "d2dmoe", num_experts=4, progress=False)
    assert isinstance(next(iter(moe_layers(moe)))[1].router.mlp[1], torch.nn.ReLU)
    with pytest.raises(Exception, match="router_activation"):
        upcycle.convert(build("vit"), "d2dmoe", num_experts=4, progress=False, router_activation="tanh")


# ---- the sweep measures each point after setting it --------------------------------------------------------------
def test_a_sweep_on_a_real_model_records_each_point_after_setting_it():
    moe = upcycle.convert(digits_vit(), "d2dmoe", num_experts=4, router_hidden=16, progress=False)
    held_out = {"val": HeldOut(moe, "digits", "val", examples=64)}
    set_tau(moe, 0.0)  # the model starts where the first point is not
    rows = sweep.sweep(moe, 1.0, [1.0, 0.0], set_tau, held_out, mac_examples=64)
    for row in rows:
        set_tau(moe, row["point"])
        assert row["val"] == held_out["val"].metric(moe)
        assert row["flops_fraction"] == sweep.macs_per_example(moe, held_out["val"], 64)
    assert rows[0]["flops_fraction"] < rows[1]["flops_fraction"]  # τ = 1 measured at τ = 1, not at the start's 0


# ---- τ grids and the benchmark's held-out size and paper numbers --------------------------------------------------
def below(taus, limit=0.05):
    return [tau for tau in taus if 0 < tau < limit]


def test_tau_grids_are_dense_below_0_05():
    assert len(below(load_recipe({"data": "digits"}).taus)) >= 5  # the recipe default
    for name in ("d2dmoe_vit_fashion_mnist", "moefication_minilm"):
        assert len(below(load_run_recipe(recipe_file(name))[1]["d2dmoe"]["taus"])) >= 4, name
    assert len(below(bench.FULL.vit_recipe["taus"])) >= 5 and len(below(bench.FULL.minilm_recipe["taus"])) >= 4


def test_full_benchmark_evaluates_at_least_1000_examples_per_split():
    assert bench.MIN_HELD_OUT == 1000
    for recipe in (bench.FULL.vit_recipe, bench.FULL.minilm_recipe):
        assert recipe["eval_examples"] >= bench.MIN_HELD_OUT


def test_the_paper_s_numbers_sit_next_to_ours():
    summary = {"vit.flops_fraction_at_1pt_drop": 0.46, "minilm.flops_fraction_at_1pt_drop": 0.64,
               "vit.d2dmoe_at_or_above_moefication": True}  # fmt: skip
    beside = bench.beside_paper(summary)
    assert beside["vit.flops_fraction_at_1pt_drop"]["ours"] == 0.46
    assert beside["vit.flops_fraction_at_1pt_drop"]["paper"] == 0.40
    minilm = bench.PAPER["minilm.flops_fraction_at_1pt_drop"]
    assert beside["minilm.flops_fraction_at_1pt_drop"] == {"ours": 0.64, **minilm}
    assert beside["minilm.d2dmoe_at_or_above_moefication"]["ours"] is None  # missing from ours: shown as such
    assert all({"paper", "setting", "claim"} <= set(entry) for entry in beside.values())
