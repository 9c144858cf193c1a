"""Every fast backend against the eager reference at sizes where the grouped GEMM kernel really runs (d and h
multiples of 16 bytes), in fp32 and bf16: outputs and the gradients of inputs, routing weights and every expert
tensor, with top-k, masked and dynamic-k routings; the decode path (few pairs) on its own; and the fallbacks of
``grouped_mm`` where its kernel cannot run."""

import copy

import pytest
import torch

from upcycle.layers import Routing, list_backends
from upcycle.layers.backends.few_pairs import FEW_PAIRS, few_pairs, runs
from upcycle.layers.backends.grouped_mm import kernel_runs

from .helpers import random_experts, random_sparse_routing

FAST_BACKENDS = [name for name in list_backends() if name != "eager"]
SIZES = {torch.float32: (12, 20), torch.bfloat16: (16, 24)}  # (d, h): odd, but aligned for the kernel


def _dynamic_k_routing(t: int, e: int) -> Routing:
    """Every expert named for every token, a varying number kept (D2DMoE), loads unbalanced."""
    norms = torch.rand(t, e) * torch.linspace(0.05, 1.0, e)
    mask = norms >= 0.5 * norms.max(-1, keepdim=True).values
    weights = torch.rand(t, e).add(0.1)
    return Routing(e, indices=torch.arange(e).expand(t, e), weights=weights, mask=mask)


def _routing(kind: str, t: int, e: int) -> Routing:
    if kind == "dynamic_k":
        return _dynamic_k_routing(t, e)
    return random_sparse_routing(t, e, 2, with_mask=kind == "masked", requires_grad=False)


def _run(experts, compute, x, routing, dtype):
    """Outputs and gradients (as fp32) of ``compute(experts, x, indices, weights, mask)`` in ``dtype``."""
    experts = copy.deepcopy(experts).to(dtype)
    x = x.detach().to(dtype).clone().requires_grad_(True)
    weights = routing.weights.detach().to(dtype).clone().requires_grad_(True)
    y = compute(experts, x, routing.indices, weights, routing.mask)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    (y * upstream).sum().backward()
    grads = {name: p.grad.float() for name, p in experts.named_parameters() if p.grad is not None}
    return {"y": y.detach().float(), "dx": x.grad.float(), "dweights": weights.grad.float(), **grads}


def _backend(name):
    def compute(experts, x, indices, weights, mask):
        experts.backend = name
        return experts(x, Routing(experts.num_experts, indices=indices, weights=weights, mask=mask))

    return compute


def _assert_matches(out: dict, ref: dict, dtype: torch.dtype) -> None:
    assert out.keys() == ref.keys()
    for name, value in ref.items():
        if dtype == torch.float32:
            torch.testing.assert_close(out[name], value, rtol=1e-5, atol=1e-5, msg=name)
        else:  # bf16 keeps 8 bits of mantissa: compare against the fp32 reference relative to its scale
            # (grouped_mm adds biases after its kernel has rounded to bf16: up to twice the others' error)
            scale = value.abs().max().item() + 1e-6
            torch.testing.assert_close(out[name], value, rtol=5e-2, atol=5e-2 * scale, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("routing_kind", ["top2", "masked", "dynamic_k"])
@pytest.mark.parametrize("t", [1, 7])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_backend_matches_eager_where_the_kernel_runs(backend, t, routing_kind, dtype):
    d, h = SIZES[dtype]
    torch.manual_seed(t)
    experts = random_experts(e=5, d=d, h=h, gated=True, shared_bias=True, hidden_norm=True)
    assert kernel_runs(copy.deepcopy(experts).to(dtype), torch.device("cpu"), dtype)
    x, routing = torch.randn(t, d), _routing(routing_kind, t, 5)
    reference = _run(experts, _backend("eager"), x, routing, torch.float32)
    _assert_matches(_run(experts, _backend(backend), x, routing, dtype), reference, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t, k", [(1, 1), (1, 4), (3, 2), (2, 4)])
def test_few_pairs_path_matches_eager(t, k, dtype):
    assert t * k <= FEW_PAIRS  # what the grouped backends hand to this path
    d, h = SIZES[dtype]
    experts = random_experts(e=6, d=d, h=h, gated=k % 2 == 0, bias=True)  # few_pairs leaves the shared bias out
    x = torch.randn(t, d)
    for with_mask in (False, True):
        routing = random_sparse_routing(t, 6, k, with_mask=with_mask, requires_grad=False)
        if with_mask:
            routing.mask[0, 0] = True  # at least one pair runs, so there are gradients to compare
        reference = _run(experts, _backend("eager"), x, routing, torch.float32)
        _assert_matches(_run(experts, few_pairs, x, routing, dtype), reference, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden_norm", [False, True])
def test_few_pairs_runs_a_token_s_consecutive_experts_as_one_slice(dtype, hidden_norm):
    """Experts with consecutive ids of one token (granular experts of one whole copy) run together over one slice
    of the stacked weights, whatever order top-k listed them in: eager's outputs and gradients, and one matmul
    per projection and run instead of one per expert (the routing weights scale the hidden units, no matmul)."""
    indices = torch.tensor([[3, 2, 4, 0], [1, 5, 0, 2]])  # token 0: {0}, {2, 3, 4}; token 1: {0, 1, 2}, {5}
    assert runs([0, 2, 3, 4]) == [slice(0, 1), slice(1, 4)] and runs([0, 1, 2, 5]) == [slice(0, 3), slice(3, 4)]
    d, h = SIZES[dtype]
    experts = random_experts(e=6, d=d, h=h, gated=True, bias=True, hidden_norm=hidden_norm)
    routing = Routing(6, indices=indices, weights=torch.rand(2, 4).add(0.1))
    x = torch.randn(2, d)
    _assert_matches(_run(experts, few_pairs, x, routing, dtype), _run(experts, _backend("eager"), x, routing,
                                                                        torch.float32), dtype)  # fmt: skip
    with torch.profiler.profile() as profile, torch.no_grad():
        few_pairs(experts, x, indices, routing.weights, None)
    products = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mv")
    matmuls = sum(event.count for event in profile.key_averages() if event.key in products)
    assert matmuls == 4 * 3  # 4 runs × (up, gate, down)


def test_grouped_mm_falls_back_where_its_kernel_cannot_run():
    """Widths that are no multiple of 16 bytes, float64, and a non-contiguous weight: the layer still computes the
    eager result (through the sorted backend)."""
    cpu = torch.device("cpu")
    odd = random_experts(e=5, d=12, h=7)  # h·4 bytes is no multiple of 16
    assert not kernel_runs(odd, cpu, torch.float32)
    assert not kernel_runs(random_experts(e=5, d=12, h=20), cpu, torch.bfloat16)  # 12·2 bytes
    wide = random_experts(e=5, d=16, h=24).double()
    assert not kernel_runs(wide, cpu, torch.float64)
    transposed = random_experts(e=5, d=16, h=24)
    transposed.w_up = torch.nn.Parameter(transposed.w_up.detach().transpose(1, 2).contiguous().transpose(1, 2))
    assert not kernel_runs(transposed, cpu, torch.float32)
    for experts, dtype in ((odd, torch.float32), (wide, torch.float64), (transposed, torch.float32)):
        x, routing = torch.randn(9, experts.d_model, dtype=dtype), random_sparse_routing(9, 5, 2, with_mask=True)
        routing.weights = routing.weights.to(dtype)
        experts.backend = "eager"
        reference = experts(x, routing)
        experts.backend = "grouped_mm"
        torch.testing.assert_close(experts(x, routing), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_inference_mode_matches_training_mode(backend):
    """In-place activations under inference_mode change nothing in the outputs."""
    experts = random_experts(e=5, d=16, h=24, gated=True, hidden_norm=True)
    x, routing = torch.randn(13, 16), random_sparse_routing(13, 5, 3, requires_grad=False)
    experts.backend = backend
    with_grad = experts(x, routing)
    with torch.inference_mode():
        without = experts(x, routing)
    torch.testing.assert_close(without, with_grad.detach(), rtol=1e-6, atol=1e-6)
