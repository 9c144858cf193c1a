"""Every fast backend against the eager reference (and eager against the naive per-token loop):
outputs and gradients of inputs, every expert weight and the routing weights."""

import pytest
import torch

from upcycle.layers import MoE, TopKRouter, list_backends
from upcycle.layers.reference import naive_sparse_moe

from .helpers import random_experts, random_sparse_routing

FAST_BACKENDS = [name for name in list_backends() if name != "eager"]


def _run(experts, backend, x, routing):
    experts.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    weights = routing.weights.detach().clone().requires_grad_(True)
    routing = type(routing)(routing.num_experts, indices=routing.indices, weights=weights, mask=routing.mask)
    experts.backend = backend
    y = experts(x, routing)
    upstream = torch.randn_like(y, generator=torch.Generator().manual_seed(1))
    (y * upstream).sum().backward()
    grads = {name: p.grad.clone() for name, p in experts.named_parameters()}
    return y.detach(), x.grad, weights.grad, grads


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("t", [1, 29])
def test_backend_matches_eager(backend, k, bias, gated, t):
    # the hidden LayerNorm rides along with the gated case so every parameter kind is compared
    experts = random_experts(e=5, d=100, h=37, gated=gated, bias=bias, shared_bias=bias, hidden_norm=gated)
    x = torch.randn(t, 100)
    routing = random_sparse_routing(t, 5, k)
    ref = _run(experts, "eager", x, routing)
    out = _run(experts, backend, x, routing)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-5)  # outputs
    torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-5)  # d/dx
    torch.testing.assert_close(out[2], ref[2], rtol=1e-5, atol=1e-5)  # d/d routing weights
    assert out[3].keys() == ref[3].keys()
    for name in ref[3]:
        torch.testing.assert_close(out[3][name], ref[3][name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", list_backends())
def test_backend_with_dropped_pairs_matches_naive(backend):
    experts = random_experts(e=4, d=12, h=7, gated=True, shared_bias=True)
    x = torch.randn(9, 12)
    routing = random_sparse_routing(9, 4, 3, with_mask=True)
    assert not routing.mask.all()
    experts.backend = backend
    torch.testing.assert_close(experts(x, routing), naive_sparse_moe(experts, x, routing), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", list_backends())
def test_all_pairs_dropped_gives_only_shared_bias(backend):
    experts = random_experts(e=3, d=8, h=5, shared_bias=True)
    routing = random_sparse_routing(4, 3, 2)
    routing.mask = torch.zeros(4, 2, dtype=torch.bool)
    experts.backend = backend
    torch.testing.assert_close(experts(torch.randn(4, 8), routing), experts.shared_bias.expand(4, 8).detach())


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_router_gradient_through_moe_layer_matches_eager(backend):
    """Gradients reach the router weights identically through either backend.

    In float64: the router gradient sums many cancelling terms (|grad| up to ~2.6e3), so in float32 the two
    backends' summation orders alone move small entries by 1e-4 relative; in float64 they agree to rounding."""
    grads = {}
    x = torch.randn(3, 7, 100, dtype=torch.float64)
    for name in ("eager", backend):
        torch.manual_seed(0)
        layer = MoE(TopKRouter(100, 6, top_k=3, init_std=0.5), random_experts(e=6, d=100, h=37)).double()
        layer.experts.backend = name
        layer(x).square().sum().backward()
        grads[name] = layer.router.gate.weight.grad
    torch.testing.assert_close(grads[backend], grads["eager"], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", list_backends())
def test_bf16_autocast_close_to_fp32(backend):
    experts = random_experts(e=4, d=32, h=16)
    x = torch.randn(10, 32)
    routing = random_sparse_routing(10, 4, 2, requires_grad=False)
    experts.backend = backend
    reference = experts(x, routing)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = experts(x, routing)
    torch.testing.assert_close(low.float(), reference, rtol=0.05, atol=0.1)


@pytest.mark.parametrize("hidden_norm", [False, True])
def test_eager_matches_naive_reference(hidden_norm):
    experts = random_experts(e=5, d=20, h=9, gated=True, shared_bias=True, hidden_norm=hidden_norm)
    x = torch.randn(11, 20)
    routing = random_sparse_routing(11, 5, 2)
    experts.backend = "eager"
    torch.testing.assert_close(experts(x, routing), naive_sparse_moe(experts, x, routing), rtol=1e-5, atol=1e-5)
