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


def sequence_balance_loss(scores: torch.Tensor, expert_indices: torch.Tensor, sequence_ids: torch.Tensor | None = None
                          ) -> torch.Tensor:  # fmt: skip
    """DeepSeek-V3's complementary sequence-wise balance loss (arXiv 2412.19437, eqs. 17-20), unweighted.

    scores         [t, e]  sigmoid affinities s (normalised here over the experts: s' = s / Σ_j s_j)
    expert_indices [t, k]  chosen experts
    sequence_ids   [t]     which sequence each token belongs to (None: all tokens one sequence)
    Per sequence of T tokens, ``Σ_i f_i · P_i`` with ``f_i = e / (k T) · #{t: i chosen}`` (not differentiable) and
    ``P_i = mean_t s'_{i,t}``; averaged over the sequences. Perfectly uniform routing gives 1.
    """
    t, e = scores.shape
    k = expert_indices.shape[-1]
    seq = torch.zeros(t, dtype=torch.long, device=scores.device) if sequence_ids is None else sequence_ids
    n = int(seq.max()) + 1 if t else 1
    counts = torch.bincount(seq, minlength=n)  # T per sequence [n]; a sequence all padding has none
    length = counts.clamp_min(1).to(scores.dtype)[:, None]  # [n, 1]
    chosen = torch.zeros_like(scores).scatter_(1, expert_indices, 1.0)  # [t, e]
    f = torch.zeros(n, e, dtype=scores.dtype, device=scores.device).index_add_(0, seq, chosen) * e / (k * length)
    normalised = scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)  # s' [t, e]
    p = torch.zeros(n, e, dtype=scores.dtype, device=scores.device).index_add_(0, seq, normalised) / length
    return (f * p).sum(-1)[counts > 0].mean()
