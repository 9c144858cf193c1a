"""Auxiliary-loss-free load balancing (DeepSeek-V3, arXiv 2412.19437, section 2.1.2), for routers that choose experts
by score + a per-expert bias.

The bias ``expert_bias [e]`` (a buffer: saved with the model, never trained by gradients, zeros at init) shifts only
which experts are chosen. After each training forward, ``b_i += γ · sign(mean load − load_i)`` with load_i the tokens
routed to expert i (summed over processes under DDP: one bias for the global batch), γ = ``bias_update_rate``
(0 disables it); eval forwards never change it. It stays fp32 when the model moves to bf16, where steps of γ = 0.001
would vanish next to scores near 1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class BalancingBias(nn.Module):
    """Mixin for a :class:`Router`: call ``_init_balancing`` in ``__init__`` and ``_balance(indices)`` in forward."""

    def _init_balancing(self, num_experts: int, bias_update_rate: float) -> None:
        if bias_update_rate < 0:
            raise ValueError(f"bias_update_rate must be >= 0, got {bias_update_rate}")
        self.bias_update_rate = bias_update_rate
        self.register_buffer("expert_bias", torch.zeros(num_experts))  # b [e]

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.expert_bias = self.expert_bias.float()
        return self

    @torch.no_grad()
    def _balance(self, indices: torch.Tensor) -> None:
        """Move b against the load of ``indices [t, k]`` (training forwards only)."""
        if not (self.training and self.bias_update_rate):
            return
        load = torch.bincount(indices.reshape(-1), minlength=self.expert_bias.shape[0]).float()  # [e]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)
        self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
