"""Sigmoid routing with auxiliary-loss-free load balancing (DeepSeek-V3, arXiv 2412.19437, section 2.1.2).

Scores ``s = sigmoid(W x)`` in fp32. A per-expert bias ``b`` (a buffer, zeros at init) is added *only for choosing*:
each token takes the top-k experts of ``s + b``, while its combine weights come from the unbiased ``s`` of the chosen
experts, divided by their sum with ``renormalize`` (``norm_topk_prob``) and times ``scaling``
(``routed_scaling_factor``). Group-limited routing (``num_groups`` > 1): experts form equal groups, a group's score
is the sum of its two highest biased scores, and a token chooses only among its ``topk_groups`` best groups
(transformers' ``DeepseekV3TopkRouter``).

Aux-loss-free balancing: training forwards count the tokens routed to each expert, and at the end of each optimizer
step (:func:`~upcycle.layers.update_expert_biases`, which ``upcycle.train`` calls) ``b_i += γ · sign(mean load −
load_i)`` over the step's global batch (summed over processes under DDP, as the paper balances), γ =
``bias_update_rate`` (DeepSeek-V3: 0.001; 0 disables it). No gradient reaches ``b`` and eval forwards never count.
The complementary sequence-wise balance loss goes to ``aux_losses["sequence_balance"]`` (its coefficient:
``aux.sequence_balance``).
With all rows equal (zero-initialised router) every token gets k experts of weight 1/k when renormalised, so copies of
one FFN reproduce it exactly, as with softmax top-k.
"""

from __future__ import annotations

import torch
from torch import nn

from ..losses import sequence_balance_loss
from ..routing import Routing
from .balancing import BalancingBias
from .base import Router, register_router


@register_router("sigmoid")
class SigmoidRouter(BalancingBias, Router):
    kind = "sparse"
    fixed_k = True
    linear_logits = True
    reads_sequences = True  # the MoE layer passes which sequence each token is from (the sequence-wise loss)

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        renormalize: bool = True,
        scaling: float = 1.0,
        num_groups: int = 1,
        topk_groups: int = 1,
        bias_update_rate: float = 0.001,
        init: str = "normal",
        init_std: float = 0.02,
    ):
        super().__init__(d_model, num_experts)
        if num_groups < 1 or num_experts % num_groups:
            raise ValueError(f"num_groups must divide num_experts={num_experts}, got {num_groups}")
        if not 1 <= topk_groups <= num_groups:
            raise ValueError(f"topk_groups must be between 1 and num_groups={num_groups}, got {topk_groups}")
        if not 1 <= top_k <= topk_groups * (num_experts // num_groups):
            raise ValueError(
                f"top_k must be between 1 and the experts of the topk_groups={topk_groups} chosen groups "
                f"({topk_groups * (num_experts // num_groups)}), got {top_k}"
            )
        if scaling <= 0:
            raise ValueError(f"scaling must be > 0, got {scaling}")
        if init not in ("zero", "normal"):
            raise ValueError(f"router init must be 'zero' or 'normal', got {init!r}")
        self.top_k, self.renormalize, self.scaling = top_k, renormalize, scaling
        self.num_groups, self.topk_groups = num_groups, topk_groups
        self._init_balancing(num_experts, bias_update_rate)
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self._spec = {
            "d_model": d_model, "num_experts": num_experts, "top_k": top_k, "renormalize": renormalize,
            "scaling": scaling, "num_groups": num_groups, "topk_groups": topk_groups,
            "bias_update_rate": bias_update_rate,
        }  # fmt: skip
        if init == "zero":
            nn.init.zeros_(self.gate.weight)
        else:
            nn.init.normal_(self.gate.weight, std=init_std)

    @property
    def top_k(self) -> int:
        return self._top_k

    @top_k.setter
    def top_k(self, value: int) -> None:  # settable for k sweeps (set_top_k); kept in the spec so it saves
        allowed = self.topk_groups * (self.num_experts // self.num_groups) if hasattr(self, "topk_groups") else None
        if not 1 <= value <= (allowed or self.num_experts):
            raise ValueError(f"top_k must be between 1 and {allowed or self.num_experts}, got top_k={value}")
        self._top_k = int(value)
        if "top_k" in self._spec:
            self._spec["top_k"] = self._top_k

    def forward(self, x: torch.Tensor, sequence_ids: torch.Tensor | None = None) -> Routing:  # x [t, d]
        logits = nn.functional.linear(x.float(), self.gate.weight.float())  # [t, e] in fp32, as DeepSeek-V3
        scores = logits.sigmoid()  # s [t, e]
        biased = scores.detach() + self.expert_bias  # s + b [t, e]: for choosing only
        if self.num_groups > 1:
            biased = self._mask_groups(biased)
        indices = biased.topk(self.top_k, dim=-1).indices  # [t, k]
        weights = scores.gather(1, indices)  # [t, k] unbiased
        if self.renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * self.scaling
        self._count_load(indices)
        probs = scores / scores.sum(-1, keepdim=True)  # s' [t, e]: the statistics read a distribution
        aux = {}  # training reads it; inference (autograd off) skips its ops (upcycle.layers.routing)
        if torch.is_grad_enabled():
            aux["sequence_balance"] = sequence_balance_loss(scores, indices, sequence_ids)
        return Routing(
            self.num_experts, indices=indices, weights=weights, router_logits=logits, router_probs=probs,
            aux_losses=aux,
        )  # fmt: skip

    def _mask_groups(self, biased: torch.Tensor) -> torch.Tensor:
        """``biased`` with the experts outside each token's ``topk_groups`` best groups set to -inf."""
        t, g = biased.shape[0], self.num_groups
        grouped = biased.view(t, g, -1)  # [t, g, e/g]
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # [t, g]
        chosen = group_scores.topk(self.topk_groups, dim=-1).indices  # [t, topk_groups]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)  # [t, g]
        return grouped.masked_fill(~keep[..., None], float("-inf")).view(t, -1)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, top_k={self.top_k}, renormalize={self.renormalize}, scaling={self.scaling}, "
            f"groups={self.topk_groups}/{self.num_groups}, bias_update_rate={self.bias_update_rate}"
        )
