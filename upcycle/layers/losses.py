"""Auxiliary losses as pure functions of tensors. Nothing here keeps state; the training loop weights and sums.

- Switch load balancing (Fedus et al., arXiv 2101.03961, eq. 4), generalised to top-k.
- Router z-loss (Zoph et al., ST-MoE, arXiv 2202.08906, eq. 5).
- Activation sparsity penalties used by D2DMoE (arXiv 2310.04361): squared Hoyer and L1.
"""

from __future__ import annotations

import torch


def load_balancing_loss(router_probs: torch.Tensor, expert_indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``e · Σ_i f_i · P_i``.

    router_probs   [t, e]  probabilities the choice was made from
    expert_indices [t, k]  chosen experts
    f_i = share of the t·k assignments that go to expert i (not differentiable), P_i = mean probability of expert i.
    Perfectly uniform routing gives exactly 1 for any k (HF's Mixtral variant sums over k and gives k instead).
    """
    counts = torch.bincount(expert_indices.reshape(-1), minlength=num_experts).to(router_probs.dtype)
    assignment_share = counts / counts.sum().clamp_min(1)  # f [e]
    mean_prob = router_probs.reshape(-1, num_experts).mean(0)  # P [e]
    return num_experts * torch.sum(assignment_share * mean_prob)


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``logsumexp(logits)²``; keeps router logits small. router_logits [..., e]."""
    return torch.logsumexp(router_logits.float(), dim=-1).pow(2).mean()


def hoyer_sparsity(activations: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Squared Hoyer measure per token, ``‖a‖₁² / ‖a‖₂²``, averaged over tokens. activations [..., h].

    Ranges from 1 (one active unit) to h (all units equal); minimising it makes activations sparse while being
    scale-invariant. An all-zero token contributes 0.
    """
    a = activations.float()
    l1 = a.abs().sum(-1)
    l2_squared = a.pow(2).sum(-1)
    return (l1.pow(2) / (l2_squared + eps)).mean()


def l1_sparsity(activations: torch.Tensor) -> torch.Tensor:
    """L1 norm of each token's activations ``[..., h]``, averaged over tokens (D2DMoE's ``relu_l1``, arXiv
    2310.04361): summed over the hidden units, so a coefficient means what the authors' coefficients mean at any
    width (a mean over units would make it h times weaker)."""
    return activations.float().abs().sum(-1).mean()
