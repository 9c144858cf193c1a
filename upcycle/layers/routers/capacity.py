"""Expert capacity for token-choice routing (GShard, arXiv 2006.16668; Switch, arXiv 2101.03961).

Each expert accepts at most ``c = ceil(capacity_factor · t · k / e)`` pairs. Priority goes to every token's first
choice before any second choice, then by token order; pairs over capacity are dropped (the token's residual
carries it through that layer).
"""

from __future__ import annotations

import math

import torch


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_mask(indices: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """indices [t, k] -> [t, k] bool, True where the pair fits in its expert's capacity."""
    t, k = indices.shape
    choice_major = indices.t().reshape(-1)  # [k*t]: all first choices, then all second choices, ...
    order = torch.argsort(choice_major, stable=True)
    counts = torch.bincount(choice_major, minlength=num_experts)
    group_start = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(choice_major)
    rank[order] = torch.arange(k * t, device=indices.device) - group_start[choice_major[order]]
    return (rank < capacity).view(k, t).t()
