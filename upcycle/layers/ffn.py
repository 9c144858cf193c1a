"""A dense feed-forward block (plain or gated) used as the shared expert and as the dense baseline.

Plain:  y = W_down · act(W_up · x + b_up) + b_down
Gated:  y = W_down · (act(W_gate · x + b_gate) ⊙ (W_up · x + b_up)) + b_down      (SwiGLU: act = SiLU; arXiv 2002.05202)
"""

from __future__ import annotations

import torch
from torch import nn

from .activations import get_activation
from .one_row import one_row_kernels


class FFN(nn.Module):
    def __init__(self, d_model: int, d_hidden: int, activation: str = "gelu", gated: bool = False, bias: bool = True):
        super().__init__()
        if d_model < 1 or d_hidden < 1:
            raise ValueError(f"FFN needs d_model >= 1 and d_hidden >= 1, got {d_model}, {d_hidden}")
        self.activation = activation
        self.act = get_activation(activation)
        self.up = nn.Linear(d_model, d_hidden, bias=bias)
        self.gate = nn.Linear(d_model, d_hidden, bias=bias) if gated else None
        self.down = nn.Linear(d_hidden, d_model, bias=bias)

    def spec(self) -> dict:
        return {
            "d_model": self.up.in_features, "d_hidden": self.up.out_features, "activation": self.activation,
            "gated": self.gate is not None, "bias": self.up.bias is not None,
        }  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., d] -> [..., d]
        with one_row_kernels(x):
            if self.gate is None:
                return self.down(self.act(self.up(x)))
            return self.down(self.act(self.gate(x)) * self.up(x))
