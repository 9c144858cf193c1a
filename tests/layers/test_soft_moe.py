"""Soft MoE slot routing: shapes, gradients, a known output, and the naive reference."""

import torch

from upcycle.layers import FFN, MoE, SoftMoERouter
from upcycle.layers.reference import naive_slot_moe

from .helpers import random_experts


def test_shapes_and_softmax_axes():
    router = SoftMoERouter(16, num_experts=3, slots_per_expert=2)
    routing = router(torch.randn(4, 9, 16))
    assert routing.dispatch.shape == routing.combine.shape == (4, 9, 6)
    torch.testing.assert_close(routing.dispatch.sum(1), torch.ones(4, 6))  # each slot mixes tokens
    torch.testing.assert_close(routing.combine.sum(2), torch.ones(4, 9))  # each token mixes slots


def test_one_expert_one_slot_zero_queries_is_ffn_of_the_token_mean():
    """Zero slot queries -> uniform dispatch -> the slot is the mean token; one slot -> combine weight 1."""
    ffn = FFN(12, 20)
    experts = random_experts(e=1, d=12, h=20)
    with torch.no_grad():
        experts.w_up[0].copy_(ffn.up.weight)
        experts.b_up[0].copy_(ffn.up.bias)
        experts.w_down[0].copy_(ffn.down.weight)
        experts.b_down[0].copy_(ffn.down.bias)
    router = SoftMoERouter(12, num_experts=1, slots_per_expert=1)
    torch.nn.init.zeros_(router.slot_queries)
    layer = MoE(router, experts)
    x = torch.randn(3, 5, 12)
    expected = ffn(x.mean(1, keepdim=True)).expand(3, 5, 12)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_matches_naive_reference_and_gradients_flow():
    experts = random_experts(e=3, d=10, h=6, gated=True, shared_bias=True)
    router = SoftMoERouter(10, num_experts=3, slots_per_expert=2, normalize=True)
    layer = MoE(router, experts)
    x = torch.randn(2, 7, 10, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, naive_slot_moe(experts, x, layer.last_routing), rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_examples_do_not_mix():
    """Dispatch is a softmax within one example: changing example 1 leaves example 0's output unchanged."""
    layer = MoE(SoftMoERouter(8, 2, 2), random_experts(e=2, d=8, h=4))
    x = torch.randn(2, 5, 8)
    y = layer(x)
    x2 = x.clone()
    x2[1] += 5
    torch.testing.assert_close(layer(x2)[0], y[0])
