"""The sorted backend on what dynamic-k produces: every expert named for every token, most pairs masked off,
loads far from balanced, some experts empty. Outputs and every gradient against the eager reference."""

import pytest
import torch

from upcycle.layers import Routing
from upcycle.layers.reference import naive_sparse_moe

from .helpers import random_experts


def _dynamic_k_routing(t: int, e: int, requires_grad: bool = True) -> Routing:
    norms = torch.rand(t, e) * torch.linspace(0.05, 1.0, e)  # later experts win more often: unbalanced loads
    mask = norms >= 0.6 * norms.max(-1, keepdim=True).values
    mask[:, 0] = False  # one expert nobody runs
    mask[torch.arange(t), norms.argmax(-1)] = True
    weights = torch.rand(t, e).add(0.1).requires_grad_(requires_grad)  # non-unit, so weight gradients are checked
    return Routing(e, indices=torch.arange(e).expand(t, e), weights=weights, mask=mask)


def _run(experts, backend, x, routing):
    experts.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    weights = routing.weights.detach().clone().requires_grad_(True)
    routing = Routing(routing.num_experts, indices=routing.indices, weights=weights, mask=routing.mask)
    experts.backend = backend
    y = experts(x, routing)
    (y * torch.randn_like(y, generator=torch.Generator().manual_seed(1))).sum().backward()
    grads = {name: p.grad for name, p in experts.named_parameters()}
    return y.detach(), x.grad, weights.grad, grads


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("t", [1, 33])
def test_sorted_matches_eager_on_dynamic_k_routing(gated, t):
    experts = random_experts(e=7, d=20, h=9, gated=gated, shared_bias=True)
    x = torch.randn(t, 20)
    routing = _dynamic_k_routing(t, 7)
    ref, out = _run(experts, "eager", x, routing), _run(experts, "sorted", x, routing)
    for a, b in zip(out[:3], ref[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name, grad in ref[3].items():
        if grad is None:  # expert weights of a layer whose every routed pair was dropped
            assert out[3][name] is None, name
        else:
            torch.testing.assert_close(out[3][name], grad, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(out[3]["w_up"][0], torch.zeros_like(out[3]["w_up"][0]))  # expert 0 never ran


def test_sorted_matches_the_naive_loop_in_bf16():
    experts = random_experts(e=5, d=16, h=8, dtype=torch.bfloat16)
    x = torch.randn(11, 16, dtype=torch.bfloat16)
    routing = _dynamic_k_routing(11, 5, requires_grad=False)
    experts.backend = "sorted"
    torch.testing.assert_close(experts(x, routing), naive_sparse_moe(experts, x, routing), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", ["sorted", "grouped_mm"])
@pytest.mark.parametrize("unit", [False, True])
def test_without_autograd_each_expert_adds_into_its_tokens_and_unit_weights_are_not_multiplied(backend, unit):
    """Inference, as D2DMoE's sweeps run it: the same outputs as eager, no joined copy of all expert outputs
    (``sorted``), and no weighting product when every weight is 1 (D2DMoE sums its experts unweighted)."""
    experts = random_experts(e=6, d=16, h=8, gated=False)  # ReLU: the only product would be the weighting
    routing = _dynamic_k_routing(23, 6, requires_grad=False)
    if unit:
        routing.weights = torch.ones_like(routing.weights)
    x = torch.randn(23, 16)
    experts.backend = "eager"
    with torch.no_grad():
        reference = experts(x, routing)
        experts.backend = backend
        with torch.profiler.profile() as profile:
            out = experts(x, routing)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    ops = {event.key for event in profile.key_averages()}
    assert ("aten::mul" in ops) != unit
    if backend == "sorted":
        assert "aten::cat" not in ops


def test_sorted_without_autograd_matches_with_it():
    """Without autograd each expert gathers its own rows; with it the rows are gathered once: same outputs."""
    experts = random_experts(e=7, d=20, h=9, gated=True, shared_bias=True)
    x, routing = torch.randn(31, 20), _dynamic_k_routing(31, 7, requires_grad=False)
    experts.backend = "sorted"
    with_grad = experts(x, routing)
    with torch.no_grad():
        without = experts(x, routing)
    torch.testing.assert_close(without, with_grad.detach(), rtol=1e-6, atol=1e-6)
