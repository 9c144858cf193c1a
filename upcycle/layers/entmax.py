"""Exact entmax-1.5 (Peters, Niculae & Martins, "Sparse Sequence-to-Sequence Models", arXiv 1905.05702).

``entmax15(z)`` maps scores to a probability vector like softmax, but low scores get *exactly* zero: it is the
maximiser of ``pᵀz + H(p)`` over the simplex with the Tsallis 1.5 entropy, whose solution is

    p_i = [z_i / 2 - τ]_+²        with the threshold τ set so that Σ_i p_i = 1.

The released MoE Jetpack code (arXiv 2406.04801) uses it for SpheroMoE's combine weights.

Threshold, exactly and without iterating (the paper's sort-based Alg. 2): sort u = z/2 in decreasing order; if the
support is the top ρ entries, ``Σ_{i≤ρ} (u_i - τ)² = 1`` solves to ``τ_ρ = mean_ρ - sqrt((1 - ρ·var_ρ) / ρ)``
(mean and variance of the top ρ). The support is the largest ρ with ``τ_ρ ≤ u_ρ``.

Backward in closed form: with ``g = sqrt(p)`` (zero off the support) the Jacobian is ``diag(g) - g gᵀ / Σg``, so
``Jᵀv = g ⊙ v - g (gᵀv) / Σg`` (J is symmetric). Custom rather than autograd through the sort: cheaper, and exact.
Dimension letters: m = the size of the normalised dim.
"""

from __future__ import annotations

import torch


def _entmax15_threshold(u: torch.Tensor) -> torch.Tensor:
    """τ for scores ``u [..., m]`` (already halved), ``[..., 1]``."""
    u_sorted = torch.sort(u, dim=-1, descending=True).values  # [..., m]
    rho = torch.arange(1, u.shape[-1] + 1, device=u.device, dtype=u.dtype)  # [m]: candidate support sizes
    mean = u_sorted.cumsum(-1) / rho
    mean_sq = u_sorted.square().cumsum(-1) / rho
    # (1 - ρ·var) / ρ; rounding can push it a hair below zero where the support is a single entry
    delta = ((1 - rho * (mean_sq - mean.square())) / rho).clamp_min(0)
    tau = mean - delta.sqrt()  # [..., m]: τ_ρ for every ρ
    support = (tau <= u_sorted).sum(-1, keepdim=True)  # [..., 1], >= 1 (ρ = 1 always qualifies)
    return tau.gather(-1, support - 1)


class _Entmax15(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, dim: int) -> torch.Tensor:
        u = z.movedim(dim, -1) / 2
        u = u - u.amax(-1, keepdim=True)  # τ is shift-equivariant; keeps the cumulative sums small
        p = (u - _entmax15_threshold(u)).clamp_min(0).square().movedim(-1, dim)
        ctx.dim = dim
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (p,) = ctx.saved_tensors
        g = p.sqrt()
        grad_in = g * grad
        grad_in = grad_in - g * grad_in.sum(ctx.dim, keepdim=True) / g.sum(ctx.dim, keepdim=True)
        return grad_in, None


def entmax15(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Entmax-1.5 of ``z`` along ``dim``: non-negative, sums to 1, exact zeros on low scores. Same shape as z."""
    return _Entmax15.apply(z, dim)
