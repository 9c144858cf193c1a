"""Dense equivalence: a one-expert MoE, and E identical copies with renormalised top-k, equal the dense FFN."""

import pytest
import torch

from upcycle.layers import FFN, Experts, MoE, TopKRouter, list_backends


def copies_of(ffn: FFN, num_experts: int) -> Experts:
    gated = ffn.gate is not None
    experts = Experts(num_experts, ffn.up.in_features, ffn.up.out_features, ffn.activation, gated=gated)
    with torch.no_grad():
        experts.w_up.copy_(ffn.up.weight.expand(num_experts, -1, -1))
        experts.b_up.copy_(ffn.up.bias.expand(num_experts, -1))
        experts.w_down.copy_(ffn.down.weight.expand(num_experts, -1, -1))
        experts.b_down.copy_(ffn.down.bias.expand(num_experts, -1))
        if gated:
            experts.w_gate.copy_(ffn.gate.weight.expand(num_experts, -1, -1))
            experts.b_gate.copy_(ffn.gate.bias.expand(num_experts, -1))
    return experts


@pytest.mark.parametrize("backend", list_backends())
@pytest.mark.parametrize("gated", [False, True])
def test_one_expert_moe_equals_dense_ffn(backend, gated):
    ffn = FFN(24, 40, activation="silu" if gated else "gelu", gated=gated)
    moe = MoE(TopKRouter(24, 1, top_k=1, renormalize=False), copies_of(ffn, 1))
    moe.experts.backend = backend
    x = torch.randn(2, 7, 24)
    torch.testing.assert_close(moe(x), ffn(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", list_backends())
@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (8, 2), (5, 3), (6, 6)])
@pytest.mark.parametrize("init", ["zero", "normal"])
def test_identical_copies_with_renormalised_topk_equal_dense(backend, num_experts, top_k, init):
    ffn = FFN(24, 40, activation="silu", gated=True)
    moe = MoE(
        TopKRouter(24, num_experts, top_k=top_k, renormalize=True, init=init, init_std=1.0), copies_of(ffn, num_experts)
    )
    moe.experts.backend = backend
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(moe(x), ffn(x), rtol=1e-5, atol=1e-5)


def test_identical_copies_without_renormalisation_shrink_output():
    """The counter-case: raw top-k probabilities sum to < 1, so the output is scaled down
    (docs/methods/sparse_upcycling.md)."""
    ffn = FFN(16, 32)
    moe = MoE(TopKRouter(16, 8, top_k=2, renormalize=False, init="zero"), copies_of(ffn, 8))
    x = torch.randn(4, 16)
    torch.testing.assert_close(moe(x), ffn(x) * (2 / 8), rtol=1e-5, atol=1e-6)
