"""Top-k router behaviour: weights, renormalisation, noise, capacity, init."""

import pytest
import torch

from upcycle.layers import TopKRouter, build_router, list_routers
from upcycle.layers.routers.capacity import capacity_mask, expert_capacity


def test_registry():
    assert {"topk", "soft"} <= set(list_routers())
    router = build_router("topk", d_model=8, num_experts=4, top_k=2)
    assert isinstance(router, TopKRouter)
    with pytest.raises(ValueError, match=r"unknown router 'nope'.*soft"):
        build_router("nope", d_model=8, num_experts=4)


def test_renormalised_weights_sum_to_one_and_raw_weights_are_probs():
    x = torch.randn(20, 16)
    renorm = TopKRouter(16, 6, top_k=3, renormalize=True, init_std=1.0)
    routing = renorm(x)
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(20))
    raw = TopKRouter(16, 6, top_k=3, renormalize=False, init_std=1.0)
    raw.load_state_dict(renorm.state_dict())
    routing_raw = raw(x)
    torch.testing.assert_close(routing_raw.weights, routing_raw.router_probs.gather(1, routing_raw.indices))
    assert torch.equal(routing_raw.indices, routing.indices)
    # chosen experts are the k most probable, in decreasing order
    assert (routing_raw.weights[:, :-1] >= routing_raw.weights[:, 1:]).all()


def test_noise_only_in_training():
    router = TopKRouter(16, 8, top_k=2, noise_std=1.0)
    x = torch.randn(50, 16)
    router.eval()
    assert torch.equal(router(x).indices, router(x).indices)
    router.train()
    assert not torch.equal(router(x).weights, router(x).weights)


def test_zero_init_gives_uniform_probabilities():
    routing = TopKRouter(16, 4, top_k=1, init="zero")(torch.randn(5, 16))
    torch.testing.assert_close(routing.router_probs, torch.full((5, 4), 0.25))


def test_capacity_mask_hand_case():
    # 4 tokens, top-2 over 2 experts, capacity 3: first choices [0,0,0,1], second choices [1,1,1,0]
    indices = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
    mask = capacity_mask(indices, num_experts=2, capacity=3)
    # expert 0: first choices of tokens 0,1,2 fill it -> token 3's second choice dropped
    # expert 1: token 3's first choice, then second choices of tokens 0,1 -> token 2's second choice dropped
    expected = torch.tensor([[True, True], [True, True], [True, False], [True, False]])
    assert torch.equal(mask, expected)
    assert expert_capacity(num_tokens=4, top_k=2, num_experts=2, capacity_factor=0.75) == 3


def test_capacity_limits_load_in_router():
    router = TopKRouter(8, 4, top_k=2, capacity_factor=1.0, init="zero")  # all tokens pick experts 0 and 1
    routing = router(torch.randn(40, 8))
    capacity = expert_capacity(40, 2, 4, 1.0)
    executed = routing.indices[routing.mask]
    assert torch.bincount(executed, minlength=4).max() <= capacity
    assert not routing.mask.all()


def test_aux_losses_present_and_differentiable():
    router = TopKRouter(8, 4, top_k=2)
    routing = router(torch.randn(10, 8))
    assert set(routing.aux_losses) == {"load_balancing", "z_loss"}
    sum(routing.aux_losses.values()).backward()
    assert router.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["topk", "sigmoid"])
def test_inference_skips_the_aux_losses_and_routes_the_same(name):
    router = build_router(name, d_model=8, num_experts=4, top_k=2).eval()
    x = torch.randn(10, 8)
    trained = router(x)
    with torch.inference_mode():
        inferred = router(x)
    assert trained.aux_losses and inferred.aux_losses == {}
    assert torch.equal(trained.indices, inferred.indices)
    torch.testing.assert_close(trained.weights.detach(), inferred.weights)
