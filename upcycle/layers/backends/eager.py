"""The reference backend: a Python loop over experts, each gathering its tokens (as HF Mixtral's eager path)."""

from __future__ import annotations

import torch

from .registry import register_backend


@register_backend("eager")
def eager(experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None):
    executed = torch.ones_like(indices, dtype=torch.bool) if mask is None else mask
    y = None
    for i in range(experts.num_experts):
        token, choice = torch.where((indices == i) & executed)  # pairs routed to expert i
        if token.numel() == 0:
            continue
        out = experts.expert_forward(i, x[token])  # [m, d]
        contribution = out * weights[token, choice].unsqueeze(-1).to(out.dtype)
        y = contribution.new_zeros(x.shape) if y is None else y
        y = y.index_add(0, token, contribution)
    return x.new_zeros(x.shape) if y is None else y
