"""Dual-path experts: the naive per-slot loop on outputs and gradients, expert dropout, describe/build, refusals."""

import json

import pytest
import torch
from torch import nn

from upcycle.layers import DualPathExperts, Experts, MoE, Routing, SoftMoERouter, build_moe, describe_moe, set_backend
from upcycle.layers.reference import naive_dual_path_moe
from upcycle.methods.jetpack.sphero import SpheroMoERouter

from .helpers import random_experts, random_sparse_routing


def random_dual(num_core=2, num_universal=3, d=12, h=10, h_universal=3, gated=False, **kwargs) -> DualPathExperts:
    core = random_experts(e=num_core, d=d, h=h, gated=gated)
    universal = random_experts(e=num_universal, d=d, h=h_universal, gated=gated) if num_universal else None
    return DualPathExperts(core, universal, **kwargs)


def random_slot_routing(b, n, e, s, generator=None) -> Routing:
    logits = torch.randn(b, n, e * s, generator=generator)
    dispatch = logits.softmax(1).requires_grad_(True)
    combine = (2 * logits).softmax(2).requires_grad_(True)
    return Routing(e, dispatch=dispatch, combine=combine, slots_per_expert=s)


def identity_routing(b, e, s) -> Routing:
    """n = S tokens, token j is slot j and reads slot j back: outputs expose each slot unmixed."""
    eye = torch.eye(e * s).expand(b, -1, -1)
    return Routing(e, dispatch=eye, combine=eye, slots_per_expert=s)


@pytest.mark.parametrize("num_universal", [0, 3])
@pytest.mark.parametrize("s", [1, 2])
@pytest.mark.parametrize("gated", [False, True])
def test_matches_naive_loop_on_outputs_and_gradients(num_universal, s, gated):
    experts = random_dual(num_universal=num_universal, gated=gated)
    routing = random_slot_routing(2, 5, experts.num_experts, s, torch.Generator().manual_seed(0))
    x = torch.randn(2, 5, 12)
    results = []
    for run in (experts, lambda x, r: naive_dual_path_moe(experts, x, r)):
        experts.zero_grad(set_to_none=True)
        for tensor in (routing.dispatch, routing.combine):
            tensor.grad = None
        xi = x.clone().requires_grad_(True)
        y = run(xi, routing)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads = {name: p.grad.clone() for name, p in experts.named_parameters()}
        results.append((y.detach(), xi.grad, routing.dispatch.grad.clone(), routing.combine.grad.clone(), grads))
    (y, dx, dd, dc, grads), (y_ref, dx_ref, dd_ref, dc_ref, grads_ref) = results
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dd, dd_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dc, dc_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys()
    assert any(name.startswith("universal.") for name in grads) == bool(num_universal)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-5, msg=name)


def test_core_slots_come_first():
    """Swapping which group holds which expert changes the output: slot j -> expert j // s, core first."""
    experts = random_dual(num_core=1, num_universal=1, h=8, h_universal=8)
    swapped = DualPathExperts(experts.universal, experts.core)
    routing, x = identity_routing(1, 2, 1), torch.randn(1, 2, 12)
    torch.testing.assert_close(experts(x, routing)[0, 0], experts.core.forward_stacked(x[:, :1])[0, 0])
    torch.testing.assert_close(swapped(x, routing)[0, 0], experts.universal.forward_stacked(x[:, :1])[0, 0])


@pytest.mark.parametrize("variant", ["paper", "released"])
def test_expert_dropout_is_identity_in_eval(variant):
    experts = random_dual(expert_dropout=0.5, dropout_variant=variant).eval()
    routing, x = random_slot_routing(3, 4, 5, 2), torch.randn(3, 4, 12)
    reference = random_dual()
    reference.load_state_dict(experts.state_dict())
    torch.testing.assert_close(experts(x, routing), reference(x, routing))


def test_paper_dropout_zeroes_whole_example_expert_blocks_at_rate_p():
    p, b, e, s = 0.3, 2000, 5, 2
    torch.manual_seed(0)
    experts = random_dual(num_core=2, num_universal=3, expert_dropout=p)
    routing = identity_routing(b, e, s)
    x = torch.randn(1, e * s, 12).expand(b, -1, -1)  # the same example b times: dropout is the only difference
    clean = experts.eval()(x, routing).view(b, e, s * 12)  # [b, e, s*d]: one block per (example, expert)
    noisy = experts.train()(x, routing).view(b, e, s * 12)
    dropped = (noisy == 0).all(-1)  # [b, e]
    kept = torch.isclose(noisy, clean / (1 - p), rtol=1e-5, atol=1e-6).all(-1)
    assert (dropped ^ kept).all()  # each block is zeroed whole or kept whole, rescaled by 1/(1-p)
    rate = dropped.float()
    assert abs(rate.mean().item() - p) < 0.02
    assert (rate.mean(0) - p).abs().max() < 0.05  # every expert, core and universal, at rate p
    assert rate.mean(1).std() > 0  # examples draw independently
    assert not torch.equal(rate[:, 0], rate[:, 1])  # ... and so do experts
    torch.testing.assert_close(noisy.mean(0), clean[0], atol=0.04 * clean.abs().max().item(), rtol=0)


def test_released_dropout_with_drop_path_drops_whole_examples_and_keeps_the_expectation():
    p, b = 0.25, 3000
    torch.manual_seed(0)
    experts = random_dual(
        num_core=2, num_universal=2, h=16, h_universal=8, expert_dropout=p, dropout_variant="released", drop_path=p
    )
    one = random_slot_routing(1, 3, 4, 1)
    dispatch, combine = (t.detach().expand(b, -1, -1) for t in (one.dispatch, one.combine))
    routing = Routing(4, dispatch=dispatch, combine=combine)
    x = torch.randn(1, 3, 12).expand(b, -1, -1)
    clean = experts.eval()(x, routing)
    noisy = experts.train()(x, routing)
    zero_examples = (noisy == 0).flatten(1).all(-1)
    assert abs(zero_examples.float().mean().item() - p) < 0.03  # drop-path on the layer output
    kept = noisy[~zero_examples]
    assert not torch.allclose(kept, clean[~zero_examples] / (1 - p))  # hidden dropout varies the kept ones
    torch.testing.assert_close(noisy.mean(0), clean[0], atol=0.05 * clean.abs().max().item(), rtol=0)


def test_describe_build_round_trip_through_json():
    router = SpheroMoERouter(12, 5, slots_per_expert=2, key_projection=True, temperatures="one", combine="entmax15")
    layer = MoE(router, random_dual(expert_dropout=0.2, dropout_variant="released"))
    spec = json.loads(json.dumps(describe_moe(layer)))
    assert spec["experts"]["type"] == "dual_path" and spec["experts"]["universal"]["d_hidden"] == 3
    rebuilt = build_moe(spec)
    assert isinstance(rebuilt.experts, DualPathExperts) and describe_moe(rebuilt) == spec
    shapes = {name: tensor.shape for name, tensor in layer.state_dict().items()}
    assert {name: tensor.shape for name, tensor in rebuilt.state_dict().items()} == shapes
    assert "experts.core.w_up" in shapes and "experts.universal.w_down" in shapes
    rebuilt.load_state_dict(layer.state_dict())
    x = torch.randn(2, 6, 12)
    torch.testing.assert_close(rebuilt.eval()(x), layer.eval()(x))


def test_core_only_round_trip_and_plain_specs_unchanged():
    core_only = MoE(SoftMoERouter(8, 3), DualPathExperts.create(3, 0, 8, 16))
    assert core_only.experts.universal is None
    spec = describe_moe(core_only)
    assert spec["experts"]["universal"] is None and isinstance(build_moe(spec).experts, DualPathExperts)
    plain = describe_moe(MoE(SoftMoERouter(8, 3), Experts(3, 8, 16)))
    assert "type" not in plain["experts"]  # saved models keep their format
    rebuilt = build_moe(json.loads(json.dumps(plain)))
    assert type(rebuilt.experts) is Experts and describe_moe(rebuilt) == plain


def test_set_backend_reaches_both_groups():
    model = nn.Sequential(MoE(SpheroMoERouter(8, 4), DualPathExperts.create(1, 3, 8, 16)))
    set_backend(model, "eager")
    assert (model[0].experts.core.backend, model[0].experts.universal.backend) == ("eager", "eager")
    assert model[0].experts.backend == "eager"


def test_sparse_routing_is_refused():
    experts = random_dual()
    with pytest.raises(ValueError, match=r"slot routing only.*'sphero'"):
        experts(torch.randn(4, 12), random_sparse_routing(4, 5, 2))


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: DualPathExperts(Experts(2, 8, 4), Experts(2, 6, 4)), "universal experts have d_model 6"),
        (lambda: DualPathExperts(Experts(2, 8, 4, shared_bias=True)), "no shared_bias"),
        (lambda: DualPathExperts(Experts(2, 8, 4), expert_dropout=1.0), r"expert_dropout must be in \[0, 1\)"),
        (lambda: DualPathExperts(Experts(2, 8, 4), dropout_variant="tokens"), "dropout_variant must be one of"),
        (lambda: MoE(SpheroMoERouter(8, 4), DualPathExperts.create(2, 1, 8, 16)), "router has 4 experts"),
    ],
)
def test_bad_configuration(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_wrong_slot_count_is_refused():
    experts = random_dual()  # 2 core + 3 universal
    routing = Routing(5, dispatch=torch.rand(1, 4, 7), combine=torch.rand(1, 4, 7), slots_per_expert=2)
    with pytest.raises(ValueError, match=r"7 slots \(2 per expert\); these dual-path experts hold 2 core"):
        experts(torch.randn(1, 4, 12), routing)
