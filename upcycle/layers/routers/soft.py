"""Soft MoE slot router (Puigcerver et al., "From Sparse to Soft Mixtures of Experts", arXiv 2308.00951).

Learnable slot queries Φ [S, d] (S = e·s). Logits L = X Φᵀ per example. Dispatch D = softmax of L over the n
tokens (each slot is a convex mix of tokens); combine C = softmax of L over the S slots (each token is a convex mix
of slot outputs). Every slot is processed by the expert that owns it (slot j -> expert j // s). With
``normalize`` both X and Φ are L2-normalised and Φ gets a learnable scale (the paper's recipe for large models).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..routing import Routing
from .base import Router, register_router


@register_router("soft")
class SoftMoERouter(Router):
    kind = "slots"

    def __init__(self, d_model: int, num_experts: int, slots_per_expert: int = 1, normalize: bool = False):
        super().__init__(d_model, num_experts)
        if slots_per_expert < 1:
            raise ValueError(f"slots_per_expert must be >= 1, got {slots_per_expert}")
        self.slots_per_expert, self.normalize = slots_per_expert, normalize
        self.slot_queries = nn.Parameter(torch.randn(num_experts * slots_per_expert, d_model) / math.sqrt(d_model))
        self.scale = nn.Parameter(torch.ones(())) if normalize else None
        self._spec = {
            "d_model": d_model, "num_experts": num_experts, "slots_per_expert": slots_per_expert, "normalize": normalize
        }  # fmt: skip

    @torch.no_grad()
    def initialize(self, generator: torch.Generator, std: float | None = None) -> None:
        """Slot queries N(0, 1/d), as the constructor draws them, but from ``generator`` (``std`` does not apply)."""
        self.slot_queries.copy_(torch.randn(self.slot_queries.shape, generator=generator) * self.d_model**-0.5)

    def forward(self, x: torch.Tensor) -> Routing:  # x [b, n, d]
        queries = self.slot_queries  # [S, d]
        if self.normalize:
            x = F.normalize(x, dim=-1)
            queries = self.scale * F.normalize(queries, dim=-1)
        logits = torch.einsum("bnd,Sd->bnS", x, queries.to(x.dtype)).float()  # [b, n, S]
        dispatch = torch.softmax(logits, dim=1)  # over tokens
        combine = torch.softmax(logits, dim=2)  # over slots
        return Routing(
            self.num_experts,
            dispatch=dispatch,
            combine=combine,
            slots_per_expert=self.slots_per_expert,
            router_logits=logits,
        )

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, slots_per_expert={self.slots_per_expert}, normalize={self.normalize}"
