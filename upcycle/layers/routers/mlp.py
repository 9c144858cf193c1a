"""The small MLP router that D2DMoE (arXiv 2310.04361, §3.3) and MoEfication (arXiv 2110.01786, §3.2) train apart
from a frozen backbone: ``d -> hidden -> e``, ReLU (or tanh, MoEfication's), no biases, one output per expert.

The two routers differ only in what the outputs mean (a predicted expert output norm, or the logit of "this expert
is active"), how they pick experts from them, and the loss that fits them; the shared parts live here. Routers of
this kind pick with unit weights, and in training mode (router fitting with teacher forcing) run every expert, so
the backbone sees exactly the dense computation while the router learns.

Dimension letters: t tokens, d model width, e experts.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..experts import ExpertStatistics
from ..routing import Routing
from .base import Router

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


class MLPRouter(Router):
    kind = "sparse"

    def __init__(self, d_model: int, num_experts: int, hidden: int = 128, activation: str = "relu"):
        super().__init__(d_model, num_experts)
        if hidden < 1:
            raise ValueError(f"router hidden width must be >= 1, got {hidden}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"router activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        self.hidden = hidden
        self.activation = activation
        first, last = nn.Linear(d_model, hidden, bias=False), nn.Linear(hidden, num_experts, bias=False)
        self.mlp = nn.Sequential(first, ACTIVATIONS[activation](), last)
        self._spec["hidden"] = hidden
        if activation != "relu":  # part of the structure; a model saved before the option rebuilds with ReLU
            self._spec["activation"] = activation

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``x [t, d]`` -> raw MLP outputs ``[t, e]`` in fp32 (routing decisions stay fp32 under autocast)."""
        return self.mlp(x).float()

    def fit_loss(self, predictions: torch.Tensor, statistics: ExpertStatistics) -> torch.Tensor:
        """Loss of ``predictions [t, e]`` (``Routing.router_logits``) against the measured expert statistics."""
        raise NotImplementedError

    @torch.no_grad()
    def initialize(self, generator: torch.Generator, std: float | None = None) -> None:
        """``nn.Linear``'s default range, U(±1/√in), drawn from ``generator`` so conversions are reproducible
        (``std`` does not apply)."""
        for layer in (self.mlp[0], self.mlp[2]):
            bound = 1.0 / math.sqrt(layer.in_features)
            layer.weight.copy_((torch.rand(layer.weight.shape, generator=generator) * 2 - 1) * bound)

    def every_expert(self, predictions: torch.Tensor, mask: torch.Tensor | None = None) -> Routing:
        """Every expert named for every token with weight 1; ``mask [t, e]`` says which run (None: all, as in
        training mode, where the backbone must see the dense computation)."""
        t, e = predictions.shape
        indices = torch.arange(e, device=predictions.device).expand(t, e)  # [t, e]
        return Routing(e, indices=indices, weights=predictions.new_ones(t, e), mask=mask, router_logits=predictions)
