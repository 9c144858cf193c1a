"""The routers D2DMoE and MoEfication train apart from the backbone: dynamic-k selection by threshold, MoEfication's
fixed top-k, teacher forcing in training mode, their fit losses, the experts' statistics they regress on, specs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from upcycle.layers import MoE, build_router, list_routers, set_tau, set_top_k
from upcycle.layers import experts as experts_module
from upcycle.layers.routers.mlp import MLPRouter
from upcycle.methods.d2dmoe.dynamic_k_router import DynamicKRouter
from upcycle.methods.d2dmoe.moefication_router import MoEficationRouter

from .helpers import random_experts


def test_registry_and_spec_round_trip():
    assert {"dynamic_k", "moefication"} <= set(list_routers())
    routers = (
        DynamicKRouter(12, 5, hidden=7, tau=0.3, zero_runs_all=True),
        MoEficationRouter(12, 5, hidden=7, top_k=3),
    )
    for router in routers:
        spec = router.spec()
        rebuilt = build_router(spec.pop("name"), **spec)
        assert type(rebuilt) is type(router) and rebuilt.spec() == router.spec()
    assert DynamicKRouter(12, 5, tau=0.3).spec()["tau"] == 0.3
    assert DynamicKRouter(12, 5).spec()["zero_runs_all"] is False


def test_router_mlp_shape_has_no_biases():
    router = DynamicKRouter(12, 5)
    assert [tuple(p.shape) for p in router.parameters()] == [(128, 12), (5, 128)]
    assert isinstance(router.mlp[1], nn.ReLU)


@pytest.mark.parametrize("tau", [0.0, 0.3, 0.7, 1.0])
def test_dynamic_k_runs_expert_i_iff_its_norm_reaches_tau_times_the_max(tau):
    router = DynamicKRouter(12, 6, hidden=16, tau=tau).eval()
    x = torch.randn(40, 12)
    routing = router(x)
    norms = router.mlp(x).abs()
    torch.testing.assert_close(routing.router_logits, norms)
    expected = norms >= tau * norms.max(-1, keepdim=True).values
    assert torch.equal(routing.mask, expected)
    assert torch.equal(routing.indices, torch.arange(6).expand(40, 6))
    assert torch.equal(routing.weights, torch.ones(40, 6))  # selected experts are summed unweighted
    if tau == 0.0:
        assert routing.mask.all()
    if tau == 1.0:  # only the expert with the largest predicted norm
        assert torch.equal(routing.mask.float().argmax(-1), norms.argmax(-1)) and (routing.mask.sum(-1) == 1).all()


@pytest.mark.parametrize("tau", [0.0, 0.3, 1.0])
def test_a_token_predicted_zero_everywhere_runs_no_expert_unless_tau_is_zero_or_zero_runs_all(tau):
    router = DynamicKRouter(12, 6, hidden=16, tau=tau).eval()
    x = torch.randn(40, 12).abs()
    x[:7] = -x[:7]  # with the first layer's weights made positive, these rows leave every ReLU unit at 0, the rest none
    with torch.no_grad():
        router.mlp[0].weight.abs_()
    norms = router.mlp(x).abs()
    assert (norms[:7] == 0).all() and (norms[7:].amax(-1) > 0).all()
    rule = norms >= tau * norms.amax(-1, keepdim=True)  # the rule as written (and the authors' code)
    routing = router(x)
    assert torch.equal(routing.mask[7:], rule[7:])  # every other token as before
    assert routing.mask[:7].all() if tau == 0 else not routing.mask[:7].any()
    router.zero_runs_all = True
    assert torch.equal(router(x).mask, rule)


def test_dynamic_k_runs_fewer_experts_as_tau_rises():
    router = DynamicKRouter(12, 8, hidden=16).eval()
    x = torch.randn(50, 12)
    executed = []
    for tau in (0.0, 0.2, 0.5, 0.8, 1.0):
        router.tau = tau
        executed.append(int(router(x).executed().sum()))
    assert executed[0] == 50 * 8 and executed[-1] == 50
    assert executed == sorted(executed, reverse=True) and executed[1] > executed[-1]


@pytest.mark.parametrize("tau", [-0.1, 1.5])
def test_tau_outside_unit_interval_is_refused(tau):
    with pytest.raises(ValueError, match=r"tau must be in \[0, 1\]"):
        DynamicKRouter(8, 4, tau=tau)
    router = DynamicKRouter(8, 4)
    with pytest.raises(ValueError, match="tau must be"):
        router.tau = tau


@pytest.mark.parametrize("cls", [DynamicKRouter, MoEficationRouter])
def test_training_mode_runs_every_expert(cls):
    router = cls(12, 5, hidden=16).train()
    routing = router(torch.randn(9, 12))
    assert routing.executed().all() and routing.top_k == 5
    assert torch.equal(routing.weights, torch.ones(9, 5))


def test_moefication_picks_a_fixed_top_k_of_its_logits_with_unit_weights():
    router = MoEficationRouter(12, 6, hidden=16, top_k=2).eval()
    x = torch.randn(30, 12)
    routing = router(x)
    logits = router.mlp(x)
    torch.testing.assert_close(routing.router_logits, logits)
    assert torch.equal(routing.indices, logits.topk(2, dim=-1).indices)
    assert routing.mask is None and torch.equal(routing.weights, torch.ones(30, 2))
    with pytest.raises(ValueError, match="top_k must be between 1 and num_experts=6"):
        router.top_k = 7


def test_fit_losses():
    torch.manual_seed(0)
    experts = random_experts(e=4, d=12, h=5, activation="relu", shared_bias=True)
    statistics = experts.per_expert_statistics(torch.randn(10, 12))
    predictions = torch.randn(10, 4)
    dynamic = DynamicKRouter(12, 4)
    assert dynamic.fit_loss(statistics.output_norms, statistics) == 0
    torch.testing.assert_close(
        dynamic.fit_loss(predictions, statistics), F.mse_loss(predictions, statistics.output_norms)
    )
    sums = statistics.activation_sums
    targets = sums / sums.max(-1, keepdim=True).values  # ReLU experts: sums >= 0, the busiest expert -> 1
    assert ((targets >= 0) & (targets <= 1)).all() and torch.allclose(targets.max(-1).values, torch.ones(10))
    torch.testing.assert_close(
        MoEficationRouter(12, 4).fit_loss(predictions, statistics),
        F.binary_cross_entropy_with_logits(predictions, targets),
    )


@pytest.mark.parametrize("gated", [False, True])
def test_per_expert_statistics_match_each_expert_run_alone(gated):
    experts = random_experts(e=3, d=10, h=6, gated=gated, shared_bias=True)
    x = torch.randn(7, 10)
    norms, sums = experts.per_expert_statistics(x)
    assert norms.shape == sums.shape == (7, 3)
    for i in range(3):
        # the shared bias runs whatever the router picks, so it is no part of an expert's output
        torch.testing.assert_close(norms[:, i], experts.expert_forward(i, x).norm(dim=-1))
        up = F.linear(x, experts.w_up[i], experts.b_up[i])
        hidden = experts.act(up) if not gated else experts.act(F.linear(x, experts.w_gate[i], experts.b_gate[i])) * up
        torch.testing.assert_close(sums[:, i], hidden.sum(-1))


def test_per_expert_statistics_in_groups_of_experts_give_the_same(monkeypatch):
    experts = random_experts(e=5, d=10, h=6, gated=True, hidden_norm=True)
    x = torch.randn(7, 10)
    whole = experts.per_expert_statistics(x)
    monkeypatch.setattr(experts_module, "_STATISTICS_BLOCK", 2 * 7 * 10)  # groups of 2, 2 and 1 experts
    grouped = experts.per_expert_statistics(x)
    for a, b in zip(grouped, whole, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(whole.output_norms[:, 4], experts.expert_forward(4, x).norm(dim=-1))


def test_initialization_is_drawn_from_the_generator():
    a, b = MLPRouter(12, 4, hidden=8), MLPRouter(12, 4, hidden=8)
    a.initialize(torch.Generator().manual_seed(3))
    b.initialize(torch.Generator().manual_seed(3))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q) and p.abs().max() <= p.shape[1] ** -0.5


def test_set_tau_and_set_top_k_reach_every_router_and_its_spec():
    model = nn.Sequential(
        MoE(DynamicKRouter(12, 4, hidden=8), random_experts(e=4, d=12, h=5)),
        MoE(DynamicKRouter(12, 4, hidden=8), random_experts(e=4, d=12, h=5)),
    )
    set_tau(model, 0.4)
    assert [layer.router.spec()["tau"] for layer in model] == [0.4, 0.4]
    with pytest.raises(ValueError, match="tau must be"):
        set_tau(model, 2.0)
    with pytest.raises(ValueError, match="no MoE layer with a fixed top-k router"):
        set_top_k(model, 2)
    top = nn.Sequential(MoE(MoEficationRouter(12, 4, hidden=8), random_experts(e=4, d=12, h=5)))
    set_top_k(top, 3)
    assert top[0].router.top_k == top[0].router.spec()["top_k"] == 3
    with pytest.raises(ValueError, match="no MoE layer with a dynamic-k router"):
        set_tau(top, 0.1)


@pytest.mark.parametrize("cls", [DynamicKRouter, MoEficationRouter])
def test_all_experts_on_equals_the_sum_of_every_expert(cls):
    experts = random_experts(e=4, d=12, h=5, shared_bias=True)
    layer = MoE(cls(12, 4, hidden=8), experts).train()
    x = torch.randn(2, 3, 12)
    expected = sum(experts.expert_forward(i, x.reshape(-1, 12)) for i in range(4)) + experts.shared_bias
    torch.testing.assert_close(layer(x), expected.reshape(2, 3, 12))
