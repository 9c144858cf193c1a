"""CMoE's analytic router (Pei et al., arXiv 2502.04416, §3.3–3.4): routed expert j is scored by the activation of
its representative hidden unit r_j, so the router needs no training.

    a_j(x)  = act(W_gate[r_j]·x + b_gate[r_j]) · (W_up[r_j]·x + b_up[r_j])   (plain FFNs: act(W_up[r_j]·x + b_up[r_j]))
    s(x)    = softmax(|a(x)|)                                  over the k routed experts
    chosen  = top-k of s(x) + b                                b: a load-balancing bias (buffer), for choosing only
    g_j     = 1 + s_j · u_j  for a chosen j                    u: a learnable scale, zeros at conversion

With u = 0 every chosen expert is summed with weight 1, as the dense FFN sums its units, so with every expert chosen
the layer is the dense FFN exactly; fine-tuning learns u (the paper's differentiable routing). After each training
step b moves by γ = ``bias_update_rate`` against each expert's load (b_j += γ·sign(mean load − load_j), the
aux-loss-free balancing of DeepSeek-V3, arXiv 2412.19437, which CMoE uses). Scores and choices run in fp32.
Dimension letters: t tokens, d model width, e routed experts, k experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...layers.activations import get_activation
from ...layers.routers.balancing import BalancingBias
from ...layers.routers.base import Router, register_router
from ...layers.routing import Routing


@register_router("cmoe")
class CMoERouter(BalancingBias, Router):
    kind = "sparse"
    fixed_k = True

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, activation: str = "silu", gated: bool = True,
                 bias: bool = False, bias_update_rate: float = 0.001):  # fmt: skip
        super().__init__(d_model, num_experts)
        self._init_balancing(num_experts, bias_update_rate)
        self.activation, self.act = activation, get_activation(activation)
        self.up = nn.Linear(d_model, num_experts, bias=bias)  # rows: W_up[r_j]
        self.gate = nn.Linear(d_model, num_experts, bias=bias) if gated else None  # rows: W_gate[r_j]
        self.scale = nn.Parameter(torch.zeros(num_experts))  # u [e]
        self._spec.update(activation=activation, gated=gated, bias=bias, bias_update_rate=bias_update_rate)
        self.top_k = top_k

    @property
    def top_k(self) -> int:
        return self._top_k

    @top_k.setter
    def top_k(self, value: int) -> None:  # settable for k sweeps (set_top_k); kept in the spec so it saves
        if not 1 <= value <= self.num_experts:
            raise ValueError(f"top_k must be between 1 and num_experts={self.num_experts}, got top_k={value}")
        self._top_k = int(value)
        self._spec["top_k"] = self._top_k

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """|a(x)| [t, e]: the representative units' activations, in magnitude, fp32."""
        x = x.float()
        up = F.linear(x, self.up.weight.float(), None if self.up.bias is None else self.up.bias.float())
        if self.gate is None:
            return self.act(up).abs()
        gate = F.linear(x, self.gate.weight.float(), None if self.gate.bias is None else self.gate.bias.float())
        return (self.act(gate) * up).abs()

    def forward(self, x: torch.Tensor) -> Routing:  # x [t, d]
        scores = self.scores(x)  # [t, e]
        probs = torch.softmax(scores, dim=-1)  # s [t, e]
        indices = (probs.detach() + self.expert_bias).topk(self.top_k, dim=-1).indices  # [t, k]
        weights = 1 + probs.gather(1, indices) * self.scale[indices]  # g [t, k]: 1 at conversion
        self._count_load(indices)
        return Routing(self.num_experts, indices=indices, weights=weights, router_logits=scores, router_probs=probs)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, top_k={self.top_k}, activation={self.activation}, "
                f"gated={self.gate is not None}, bias_update_rate={self.bias_update_rate}")  # fmt: skip
