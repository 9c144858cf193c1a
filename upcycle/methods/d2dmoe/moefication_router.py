"""MoEfication's router (Zhang et al., arXiv 2110.01786, §3.2), as D2DMoE re-implements it for its baseline
(arXiv 2310.04361, §4): the same MLP shape as the dynamic-k router, without ``abs``; output i is the logit of
"expert i is active for this token". Inference runs a fixed top-k per token, summed unweighted.

Fit with binary cross-entropy against each expert's hidden-activation sum scaled into [0, 1], backbone frozen,
every expert executing (training mode). Two choices of the authors' code are options:
  - ``activation``: the MLP's hidden activation, ``tanh`` (MoEfication's code and D2DMoE's baseline) or ``relu``
    (D2DMoE's own router);
  - ``targets``: what the sums are divided by, ``batch_max`` (the largest sum over every token and expert of the
    layer's batch, as both released codes do) or ``token_max`` (the largest sum of the token's experts, so every
    token's most active expert has target 1).
Dimension letters: t tokens, d model width, e experts, k experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...layers.experts import ExpertStatistics
from ...layers.routers.base import register_router
from ...layers.routers.mlp import MLPRouter
from ...layers.routing import Routing

TARGETS = ("batch_max", "token_max")


@register_router("moefication")
class MoEficationRouter(MLPRouter):
    fixed_k = True

    def __init__(self, d_model: int, num_experts: int, hidden: int = 128, top_k: int = 2,
                 activation: str = "relu", targets: str = "token_max"):  # fmt: skip
        # the defaults are what models saved before the options were built with; recipes choose tanh / batch_max
        super().__init__(d_model, num_experts, hidden, activation)
        if targets not in TARGETS:
            raise ValueError(f"MoEfication targets must be one of {', '.join(TARGETS)}, got {targets!r}")
        self.targets = targets
        self._spec["targets"] = targets
        self.top_k = top_k

    @property
    def top_k(self) -> int:
        return self._top_k

    @top_k.setter
    def top_k(self, value: int) -> None:
        if not 1 <= value <= self.num_experts:
            raise ValueError(f"top_k must be between 1 and num_experts={self.num_experts}, got {value}")
        self._top_k = int(value)
        self._spec["top_k"] = self._top_k  # part of the structure, so a saved model keeps its operating point

    def forward(self, x: torch.Tensor) -> Routing:  # x [t, d]
        logits = self.predict(x)  # [t, e]
        if self.training:  # teacher forcing: every expert runs while the router is fitted
            return self.every_expert(logits)
        indices = logits.topk(self.top_k, dim=-1).indices  # [t, k]
        return Routing(self.num_experts, indices=indices, weights=logits.new_ones(indices.shape), router_logits=logits)

    def fit_loss(self, predictions: torch.Tensor, statistics: ExpertStatistics) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(predictions.float(), self.fit_targets(statistics))

    def fit_targets(self, statistics: ExpertStatistics) -> torch.Tensor:
        """``[t, e]`` targets in [0, 1]: each expert's hidden-activation sum over the largest such sum of the token
        (``token_max``) or of the whole batch (``batch_max``)."""
        sums = statistics.activation_sums.float().clamp_min(0)  # [t, e]; ReLU experts: already >= 0
        scale = sums.amax(-1, keepdim=True) if self.targets == "token_max" else sums.amax()
        return sums / scale.clamp_min(1e-12)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.hidden}, activation={self.activation}, top_k={self.top_k}, "
                f"targets={self.targets}")  # fmt: skip
