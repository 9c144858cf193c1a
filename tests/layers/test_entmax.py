"""Entmax-1.5 against a bisection reference, its sparsity, and its custom backward against finite differences."""

import pytest
import torch

from upcycle.layers import entmax15


def entmax15_bisect(z: torch.Tensor, iters: int = 100) -> torch.Tensor:
    """Reference along the last dim: bisect τ in [max(z/2) - 1, max(z/2)] until Σ [z/2 - τ]_+² = 1."""
    u = z.double() / 2
    hi = u.amax(-1, keepdim=True)
    lo = hi - 1  # the top entry alone already gives mass 1 there
    for _ in range(iters):
        tau = (lo + hi) / 2
        too_much = (u - tau).clamp_min(0).square().sum(-1, keepdim=True) > 1
        lo, hi = torch.where(too_much, tau, lo), torch.where(too_much, hi, tau)
    return (u - (lo + hi) / 2).clamp_min(0).square().to(z.dtype)


@pytest.mark.parametrize("m", [1, 2, 7, 33])
@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
def test_matches_bisection_and_sums_to_one(m, scale):
    z = scale * torch.randn(5, 3, m, generator=torch.Generator().manual_seed(m))
    p = entmax15(z)
    torch.testing.assert_close(p, entmax15_bisect(z), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p.sum(-1), torch.ones(5, 3))
    assert (p >= 0).all()


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_any_dim(dim):
    z = torch.randn(4, 6, 5)
    expected = entmax15_bisect(z.movedim(dim, -1)).movedim(-1, dim)
    torch.testing.assert_close(entmax15(z, dim), expected, rtol=1e-5, atol=1e-6)


def test_exact_zeros_on_peaked_scores_and_hand_case():
    p = entmax15(torch.tensor([4.0, 0.0, 0.0, -1.0]))
    assert torch.equal(p, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    # u = z/2 = (0.5, 0, -2): support {0, 1}, (0.5 - τ)² + τ² = 1 -> τ = (0.5 - sqrt(1.75)) / 2
    tau = (0.5 - 1.75**0.5) / 2
    expected = torch.tensor([(0.5 - tau) ** 2, tau**2, 0.0])
    torch.testing.assert_close(entmax15(torch.tensor([1.0, 0.0, -4.0])), expected)


def test_uniform_scores_give_uniform_probabilities():
    torch.testing.assert_close(entmax15(torch.full((2, 6), 3.0)), torch.full((2, 6), 1 / 6))


@pytest.mark.parametrize("dim", [1, -1])
def test_gradcheck_float64(dim):
    z = (3 * torch.randn(3, 7, 4, dtype=torch.float64)).requires_grad_(True)
    assert (entmax15(z, dim) == 0).any()  # the support boundary is exercised
    assert torch.autograd.gradcheck(lambda t: entmax15(t, dim), (z,), eps=1e-6, atol=1e-6)
