"""D2DMoE and MoEfication conversions: with every expert on they reproduce the dense model; they save and load with
their router options (τ, top-k) as set after conversion; FLOPs follow the executed pairs and include the router MLP;
the router stage fits the routers and nothing else."""

import csv

import pytest
import torch

import upcycle
from tests.conversion.tiny_models import build
from upcycle.adapters import find_adapter
from upcycle.eval.flops import count_macs
from upcycle.layers import moe_layers, set_tau, set_top_k
from upcycle.methods.d2dmoe.dynamic_k_router import DynamicKRouter
from upcycle.methods.d2dmoe.moefication_router import MoEficationRouter
from upcycle.record import record_of
from upcycle.sources import load_timm
from upcycle.train import train
from upcycle.train.optim import is_router_parameter
from upcycle.train.router_fit import RouterFit
from upcycle.train.stages import apply_freeze

CASES = ["vit", "llama", "gpt2", "bert"]


@pytest.mark.parametrize("case", CASES)
def test_d2dmoe_with_tau_zero_equals_dense(case):
    dense = build(case)
    moe = upcycle.convert(dense, "d2dmoe", num_experts=4, progress=False)
    routers = [layer.router for _, layer in moe_layers(moe)]
    assert all(isinstance(r, DynamicKRouter) and r.tau == 0.0 and r.hidden == 128 for r in routers)
    check = upcycle.verify(moe, dense)
    assert check.passed(atol=1e-4, rtol=1e-4), check


@pytest.mark.parametrize("case", CASES)
def test_moefication_with_every_expert_equals_dense(case):
    dense = build(case)
    moe = upcycle.convert(dense, "moefication", num_experts=4, top_k=4, progress=False)
    assert all(isinstance(layer.router, MoEficationRouter) for _, layer in moe_layers(moe))
    check = upcycle.verify(moe, dense)
    assert check.passed(atol=1e-4, rtol=1e-4), check


def test_listed_with_their_papers():
    methods = {m["name"]: m for m in upcycle.list_methods()}
    assert methods["d2dmoe"]["paper"] == "https://arxiv.org/abs/2310.04361"
    assert methods["moefication"]["paper"] == "https://arxiv.org/abs/2110.01786"


def test_options_seed_and_refusals():
    dense = build("llama")
    a = upcycle.convert(dense, "d2dmoe", num_experts=4, router_hidden=16, tau=0.25, seed=3, progress=False)
    b = upcycle.convert(dense, "d2dmoe", num_experts=4, router_hidden=16, tau=0.25, seed=3, progress=False)
    router = moe_layers(a)[0][1].router
    assert (router.hidden, router.tau) == (16, 0.25)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name  # router MLPs drawn from the conversion generator
    c = upcycle.convert(dense, "d2dmoe", num_experts=4, router_hidden=16, seed=4, progress=False)
    assert not torch.equal(moe_layers(c)[0][1].router.mlp[0].weight, router.mlp[0].weight)
    with pytest.raises(ValueError, match="tau"):
        upcycle.convert(dense, "d2dmoe", num_experts=4, tau=1.5, progress=False)
    with pytest.raises(ValueError, match="builds its own router MLP"):
        upcycle.convert(dense, "moefication", num_experts=4, router_type="soft", progress=False)


def test_a_higher_tau_runs_fewer_experts_and_departs_from_dense():
    dense = build("llama")
    moe = upcycle.convert(dense, "d2dmoe", num_experts=4, tau=0.7, progress=False)
    layer = moe_layers(moe)[0][1]
    assert not layer.training  # installed in the mode of the (eval-mode) dense model, so τ applies at once
    assert upcycle.verify(moe, dense) > 1e-3
    assert 0 < layer.last_routing.executed().float().mean() < 1  # a per-token number of experts


def _outputs(model, dense):
    adapter = find_adapter(dense)
    inputs = adapter.example_inputs(dense, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return adapter.outputs(model.eval(), inputs)


def test_save_load_keeps_tau_set_after_conversion(tmp_path):
    dense = build("llama")
    moe = upcycle.convert(dense, "d2dmoe", num_experts=4, tau=0.2, progress=False)
    set_tau(moe, 0.5)
    upcycle.save(moe, tmp_path / "d2d")
    loaded = upcycle.load(tmp_path / "d2d")
    assert [layer.router.tau for _, layer in moe_layers(loaded)] == [0.5] * 3
    torch.testing.assert_close(_outputs(loaded, dense), _outputs(moe, dense))
    assert record_of(loaded) == record_of(moe)


def test_save_load_keeps_top_k_set_after_conversion(tmp_path):
    dense = build("gpt2")
    moe = upcycle.convert(dense, "moefication", num_experts=4, top_k=2, progress=False)
    set_top_k(moe, 3)
    upcycle.save(moe, tmp_path / "moef")
    loaded = upcycle.load(tmp_path / "moef")
    assert [layer.router.top_k for _, layer in moe_layers(loaded)] == [3] * 3
    torch.testing.assert_close(_outputs(loaded, dense), _outputs(moe, dense))


def test_flops_count_executed_pairs_and_the_router_mlp():
    dense = build("llama")
    inputs = find_adapter(dense).example_inputs(dense, generator=torch.Generator().manual_seed(3))
    moe = upcycle.convert(dense, "d2dmoe", num_experts=4, router_hidden=16, partition="random", progress=False)
    dense_macs = count_macs(dense, inputs).total
    d, e = 32, 4
    reports = {}
    for tau in (0.0, 0.3, 0.6, 1.0):
        set_tau(moe, tau)
        reports[tau] = count_macs(moe, inputs)
    at_zero = reports[0.0]
    tokens = sum(layer["tokens"] for layer in at_zero.moe.values())
    routers = tokens * (d * 16 + 16 * e)  # d -> hidden -> e per token, every layer
    assert at_zero.breakdown["routers"] == routers
    assert at_zero.total == dense_macs + routers >= dense_macs  # τ = 0: the whole dense FFN, plus the routers
    assert at_zero.dense_equivalent == dense_macs
    totals = [report.total for report in reports.values()]
    pairs = [sum(layer["pairs"] for layer in report.moe.values()) for report in reports.values()]
    assert totals == sorted(totals, reverse=True) and totals[0] > totals[-1]
    assert pairs[0] == e * tokens and pairs[-1] == tokens  # τ = 1: one expert per token


@pytest.mark.parametrize("method", ["d2dmoe", "moefication"])
def test_router_fit_trains_the_routers_towards_their_experts(method):
    dense = build("llama")
    moe = upcycle.convert(dense, method, num_experts=4, top_k=2, router_hidden=32, progress=False).train()
    apply_freeze(moe, "all_but_routers")
    inputs = find_adapter(dense).example_inputs(dense, generator=torch.Generator().manual_seed(3))
    fit = RouterFit(moe)
    optimizer = torch.optim.Adam([p for p in moe.parameters() if p.requires_grad], lr=1e-2)
    before = {name: p.detach().clone() for name, p in moe.named_parameters()}
    losses = []
    for _ in range(25):
        find_adapter(dense).outputs(moe, inputs)
        loss = fit.take()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    fit.close()
    assert losses[-1] < 0.7 * losses[0]
    for name, p in moe.named_parameters():
        assert torch.equal(p, before[name]) != is_router_parameter(name), name  # routers moved, nothing else


def test_router_fit_ignores_validation_forwards_and_refuses_other_routers():
    dense = build("llama")
    moe = upcycle.convert(dense, "d2dmoe", num_experts=4, progress=False).eval()
    fit = RouterFit(moe)
    find_adapter(dense).outputs(moe, find_adapter(dense).example_inputs(dense))
    assert fit.take().item() == 0.0
    split = upcycle.convert(dense, "neuron_split", num_experts=4, top_k=4, progress=False)
    with pytest.raises(ValueError, match="convert with method d2dmoe or moefication"):
        RouterFit(split)


def test_router_stage_in_the_training_loop(tmp_path):
    vit = load_timm("vit_tiny_patch16_224", None, False, {"img_size": 8, "patch_size": 2, "in_chans": 1,
                    "embed_dim": 48, "depth": 2, "num_heads": 3, "num_classes": 10})  # fmt: skip
    moe = upcycle.convert(vit, "d2dmoe", num_experts=4, router_hidden=16, tau=0.3, progress=False)
    before = {name: p.detach().clone() for name, p in moe.named_parameters()}
    config = {"data": "digits", "steps": 3, "batch_size": 16, "log_every": 1, "eval_batches": 1, "lr": 1e-2,
              "freeze": "all_but_routers", "aux": {"router_fit": 1.0}}  # fmt: skip
    train(moe, config, tmp_path / "run", progress=False)
    with open(tmp_path / "run" / "metrics.csv") as handle:
        fits = [float(row["router_fit"]) for row in csv.DictReader(handle) if row["split"] == "train"]
    assert len(fits) == 3 and all(value > 0 for value in fits)
    changed = {name for name, p in moe.named_parameters() if not torch.equal(p.detach().cpu(), before[name])}
    assert changed and all(is_router_parameter(name) for name in changed)
    assert upcycle.load(tmp_path / "run" / "model").blocks[0].mlp.moe.router.tau == 0.3

    split = upcycle.convert(vit, "neuron_split", num_experts=4, top_k=4, progress=False)
    with pytest.raises(ValueError, match="router_fit"):
        train(split, {**config, "steps": 1}, tmp_path / "refused", progress=False)


@pytest.mark.parametrize(
    "name, options",
    [("dynamic_k", {"hidden": 6, "tau": 0.3}), ("moefication", {"hidden": 5, "top_k": 3}),
     ("soft", {"slots_per_expert": 3})],
)  # fmt: skip
def test_seeded_router_is_the_named_router_with_its_options_drawn_from_the_generator(name, options):
    """The routers D2DMoE / MoEfication (and Jetpack's slot routers) build themselves: reproducible in the seed."""
    from upcycle.layers.routers.base import ROUTERS
    from upcycle.recycling.routers import seeded_router

    def draw(seed):
        return seeded_router(name, 24, 4, torch.Generator().manual_seed(seed), **options)

    torch.manual_seed(0)
    a = draw(1)
    torch.manual_seed(1)  # the global random state plays no part
    b, c = draw(1), draw(2)
    assert type(a) is ROUTERS.get(name)
    assert a.spec() == a.spec() | {"name": name, "d_model": 24, "num_experts": 4, **options}
    weights = [dict(r.named_parameters()) for r in (a, b, c)]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    assert any(not torch.equal(weights[0][key], weights[2][key]) for key in weights[0])
    if name == "soft":  # slot queries N(0, 1/d)
        assert 0.8 < a.slot_queries.std().item() * 24**0.5 < 1.2
        assert a.slot_queries.shape == (4 * 3, 24)
    else:  # each layer U(±1/√in), as nn.Linear draws it
        for layer in (a.mlp[0], a.mlp[2]):
            bound = layer.in_features**-0.5
            assert 0.8 * bound < layer.weight.abs().max().item() <= bound


def test_a_dynamic_k_router_built_without_tau_runs_every_expert():
    """τ = 0 by default: every expert clears 0 · max, so an evaluating router runs all of them for every token."""
    router = DynamicKRouter(8, 4, hidden=6).eval()
    routing = router(torch.randn(5, 8, generator=torch.Generator().manual_seed(0)))
    assert router.tau == 0.0
    assert routing.executed().shape == (5, 4) and routing.executed().all()
