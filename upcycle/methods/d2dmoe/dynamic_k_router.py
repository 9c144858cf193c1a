"""D2DMoE's dynamic-k router (Szatkowski et al., arXiv 2310.04361, §3.3–3.4).

An MLP predicts, for every token, the L2 norm of each expert's output: ``r = |MLP(x)|`` (``abs`` keeps it a norm).
Expert i runs for a token iff ``r_i >= τ · max_j r_j``, so the number of experts varies per token. Our convention:
``τ ∈ [0, 1]``, τ = 0 runs every expert, larger τ runs fewer (the authors' code stores 1 − τ); τ = 1 keeps only the
expert(s) with the largest predicted norm. A token whose predicted norms are all exactly 0 (a dead ReLU router over
an FFN that the sparsity stage silenced for it) runs no expert for τ > 0: the rule as written admits every expert
there (``r_i >= τ · 0``), which the authors' code does; ``zero_runs_all=True`` restores that. The selected experts
are summed unweighted. One trained router gives the whole compute/accuracy curve by sweeping ``tau`` (see
:func:`~upcycle.layers.moe.set_tau`).

Fit with MSE against the measured norms (:meth:`~upcycle.layers.Experts.per_expert_statistics`), backbone frozen,
every expert executing (training mode).
Dimension letters: t tokens, d model width, e experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...layers.experts import ExpertStatistics
from ...layers.routers.base import register_router
from ...layers.routers.mlp import MLPRouter
from ...layers.routing import Routing


@register_router("dynamic_k")
class DynamicKRouter(MLPRouter):
    def __init__(self, d_model: int, num_experts: int, hidden: int = 128, tau: float = 0.0,
                 zero_runs_all: bool = False):  # fmt: skip
        super().__init__(d_model, num_experts, hidden)
        self.tau = tau
        self.zero_runs_all = zero_runs_all

    @property
    def tau(self) -> float:
        return self._tau

    @tau.setter
    def tau(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"tau must be in [0, 1] (0 runs every expert, 1 the fewest), got {value}")
        self._tau = float(value)
        self._spec["tau"] = self._tau  # part of the structure, so a saved model keeps its operating point

    @property
    def zero_runs_all(self) -> bool:
        return self._zero_runs_all

    @zero_runs_all.setter
    def zero_runs_all(self, value: bool) -> None:
        self._zero_runs_all = bool(value)
        self._spec["zero_runs_all"] = self._zero_runs_all

    def forward(self, x: torch.Tensor) -> Routing:  # x [t, d]
        norms = self.predict(x).abs()  # [t, e] predicted ‖expert_i(x)‖
        if self.training:  # teacher forcing: every expert runs while the router is fitted
            return self.every_expert(norms)
        keep = norms >= self.tau * norms.amax(-1, keepdim=True)  # [t, e]: the argmax always passes
        if self.tau > 0 and not self.zero_runs_all:
            keep &= norms > 0  # changes only tokens predicted 0 everywhere: no expert instead of all of them
        return self.every_expert(norms, mask=keep)

    def fit_loss(self, predictions: torch.Tensor, statistics: ExpertStatistics) -> torch.Tensor:
        return F.mse_loss(predictions.float(), statistics.output_norms.float())

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden}, tau={self.tau}, zero_runs_all={self.zero_runs_all}"
