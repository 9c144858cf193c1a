"""Auxiliary-loss-free load balancing (DeepSeek-V3, arXiv 2412.19437, section 2.1.2), for routers that choose experts
by score + a per-expert bias.

The bias ``expert_bias [e]`` (a buffer: saved with the model, never trained by gradients, zeros at init) shifts only
which experts are chosen. Training forwards count the tokens routed to each expert; at the end of each optimizer step
:func:`update_expert_biases` moves ``b_i += γ · sign(mean load − load_i)`` over the step's whole batch (every
micro-batch, summed over processes under DDP: one bias for the global batch, as the paper balances), then clears the
count; γ = ``bias_update_rate`` (0 disables it). Eval forwards never count. The update lives outside forward so that
no collective runs inside it (a process that skips a forward cannot hang the others) and gradient accumulation makes
one update per step; a forward recomputed by activation checkpointing counts its tokens twice, like every other
forward of that step, which leaves the sign unchanged. The bias stays fp32 when the model moves to bf16, where steps
of γ = 0.001 would vanish next to scores near 1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class BalancingBias(nn.Module):
    """Mixin for a :class:`Router`: call ``_init_balancing`` in ``__init__`` and ``_count_load(indices)`` in forward."""

    def _init_balancing(self, num_experts: int, bias_update_rate: float) -> None:
        if bias_update_rate < 0:
            raise ValueError(f"bias_update_rate must be >= 0, got {bias_update_rate}")
        self.bias_update_rate = bias_update_rate
        self.register_buffer("expert_bias", torch.zeros(num_experts))  # b [e]
        # tokens routed to each expert since the last update [e]; not saved: a step's count, not the model's state
        self.register_buffer("routed_load", torch.zeros(num_experts), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.expert_bias, self.routed_load = self.expert_bias.float(), self.routed_load.float()
        return self

    @torch.no_grad()
    def _count_load(self, indices: torch.Tensor) -> None:
        """Add the experts chosen in ``indices [t, k]`` to the step's load (training forwards only)."""
        if self.training and self.bias_update_rate:
            self.routed_load += torch.bincount(indices.reshape(-1), minlength=self.routed_load.shape[0])


@torch.no_grad()
def update_expert_biases(model: nn.Module) -> int:
    """Move every balancing router's bias against the load counted since the last call, then clear the counts.

    Call it once per optimizer step (``upcycle.train`` does); under DDP every process calls it, and one all-reduce
    sums all routers' loads. Returns the number of routers updated."""
    routers = [m for m in model.modules() if isinstance(m, BalancingBias) and m.bias_update_rate]
    if not routers:
        return 0
    loads = torch.cat([router.routed_load for router in routers])  # [Σ e]
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(loads)
    for router, load in zip(routers, loads.split([r.routed_load.shape[0] for r in routers]), strict=True):
        if load.sum() > 0:  # a router no token reached this step keeps its bias
            router.expert_bias += router.bias_update_rate * torch.sign(load.mean() - load)
        router.routed_load.zero_()
    return len(routers)
