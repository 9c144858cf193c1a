"""Soft attention router of BAM's Mixture of Attention (Zhang et al., "BAM! Just Like That", arXiv 2408.08274 §3.2).

``g = softmax(W_a x)`` over the attention experts, and every token uses *every* expert with its weight: the paper
found soft routing of attention better than top-1 / top-2 (which did not beat BTX). The record is the sparse form
with all experts chosen (``indices[t] = 0..e-1``), so statistics read it like any other; there are no aux losses
(BAM balances only its FFN router).
"""

from __future__ import annotations

import torch
from torch import nn

from ..routing import Routing
from .base import Router, register_router


@register_router("soft_attention")
class SoftAttentionRouter(Router):
    kind = "sparse"

    def __init__(self, d_model: int, num_experts: int, init_std: float = 0.02):
        super().__init__(d_model, num_experts)
        if init_std < 0:
            raise ValueError(f"init_std must be >= 0, got {init_std}")
        self._spec["init_std"] = init_std
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=init_std)  # random, as BAM initialises every router

    def forward(self, x: torch.Tensor) -> Routing:  # x [t, d]
        logits = self.gate(x).float()  # [t, e]; fp32 even under autocast
        probs = torch.softmax(logits, dim=-1)
        indices = torch.arange(self.num_experts, device=x.device).expand(x.shape[0], -1)  # [t, e]: all experts
        return Routing(self.num_experts, indices=indices, weights=probs, router_logits=logits, router_probs=probs)
