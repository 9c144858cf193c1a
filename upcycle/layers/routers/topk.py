"""Token-choice top-k router (Shazeer et al., arXiv 1701.06538; Switch / GShard; Mixtral).

probs = softmax(W x) over experts; each token takes its k most probable experts. With ``renormalize`` the k
weights are divided by their sum (Mixtral; makes copy-upcycled experts reproduce the dense FFN exactly);
without it the raw probabilities are used (Switch, BAM). With ``unit_weights`` every chosen expert gets weight 1
(MoEfication / D2DMoE sum the selected experts of a neuron split unweighted; the router is then trained apart).
Optional Gaussian logit noise in training only, and an optional capacity limit per expert.
"""

from __future__ import annotations

import torch
from torch import nn

from ..losses import load_balancing_loss, router_z_loss
from ..routing import Routing
from .base import Router, register_router
from .capacity import capacity_mask, expert_capacity


@register_router("topk")
class TopKRouter(Router):
    kind = "sparse"
    fixed_k = True
    linear_logits = True

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        renormalize: bool = True,
        noise_std: float = 0.0,
        capacity_factor: float | None = None,
        init: str = "normal",
        init_std: float = 0.02,
        bias: bool = False,
        unit_weights: bool = False,
    ):
        super().__init__(d_model, num_experts)
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 (or None for no limit), got {capacity_factor}")
        if init not in ("zero", "normal"):
            raise ValueError(f"router init must be 'zero' or 'normal', got {init!r}")
        self.top_k, self.renormalize, self.unit_weights = top_k, renormalize, unit_weights
        self.noise_std, self.capacity_factor = noise_std, capacity_factor
        self.gate = nn.Linear(d_model, num_experts, bias=bias)
        self._spec = {
            "d_model": d_model, "num_experts": num_experts, "top_k": top_k, "renormalize": renormalize,
            "noise_std": noise_std, "capacity_factor": capacity_factor, "bias": bias, "unit_weights": unit_weights,
        }  # fmt: skip
        if init == "zero":
            nn.init.zeros_(self.gate.weight)
        else:
            nn.init.normal_(self.gate.weight, std=init_std)
        if bias:
            nn.init.zeros_(self.gate.bias)

    @property
    def top_k(self) -> int:
        return self._top_k

    @top_k.setter
    def top_k(self, value: int) -> None:  # settable for k sweeps (set_top_k); kept in the spec so it saves
        if not 1 <= value <= self.num_experts:
            raise ValueError(f"top_k must be between 1 and num_experts={self.num_experts}, got top_k={value}")
        self._top_k = int(value)
        self._spec["top_k"] = self._top_k

    def forward(self, x: torch.Tensor) -> Routing:  # x [t, d]
        logits = self.gate(x).float()  # [t, e]; routing decisions in fp32 even under autocast
        noisy = logits + self.noise_std * torch.randn_like(logits) if self.training and self.noise_std else logits
        probs = torch.softmax(noisy, dim=-1)
        weights, indices = probs.topk(self.top_k, dim=-1)  # [t, k]
        if self.unit_weights:
            weights = torch.ones_like(weights)
        elif self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        mask = None
        if self.capacity_factor is not None:
            capacity = expert_capacity(x.shape[0], self.top_k, self.num_experts, self.capacity_factor)
            mask = capacity_mask(indices, self.num_experts, capacity)
        aux = {}  # training reads them; inference (autograd off) skips their ops (upcycle.layers.routing)
        if torch.is_grad_enabled():
            aux["load_balancing"] = load_balancing_loss(probs, indices, self.num_experts)
            aux["z_loss"] = router_z_loss(logits)
        return Routing(
            self.num_experts,
            indices=indices,
            weights=weights,
            mask=mask,
            router_logits=logits,
            router_probs=probs,
            aux_losses=aux,
        )

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, top_k={self.top_k}, renormalize={self.renormalize}, "
            f"unit_weights={self.unit_weights}, noise_std={self.noise_std}, capacity_factor={self.capacity_factor}"
        )
