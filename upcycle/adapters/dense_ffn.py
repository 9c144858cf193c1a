"""A dense FFN's weights in upcycle's layout: what adapters read out of a model and recycling methods consume.

w_up [h, d], b_up [h]        first projection (plain FFN: the only one; gated: the linear branch)
w_gate [h, d], b_gate [h]    activated branch of a gated FFN (SwiGLU), else None
w_down [d, h], b_down [d]    second projection
hidden_norm                  (weight [h], bias [h], eps) of a LayerNorm over the hidden units, else None
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..layers.activations import get_activation


@dataclass
class DenseFFN:
    w_up: torch.Tensor
    w_down: torch.Tensor
    activation: str
    b_up: torch.Tensor | None = None
    w_gate: torch.Tensor | None = None
    b_gate: torch.Tensor | None = None
    b_down: torch.Tensor | None = None
    hidden_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None

    def __post_init__(self) -> None:
        get_activation(self.activation)
        h, d = self.w_up.shape
        expected = {
            "w_down": (self.w_down, (d, h)), "b_up": (self.b_up, (h,)), "w_gate": (self.w_gate, (h, d)),
            "b_gate": (self.b_gate, (h,)), "b_down": (self.b_down, (d,)),
        }  # fmt: skip
        for name, (tensor, shape) in expected.items():
            if tensor is not None and tuple(tensor.shape) != shape:
                raise ValueError(
                    f"dense FFN: {name} has shape {tuple(tensor.shape)}, expected {shape} from w_up [h, d]"
                )
        for name, tensor in self.tensors().items():
            if not torch.isfinite(tensor).all():
                raise ValueError(f"dense FFN weight {name} contains NaN or Inf; the source checkpoint is corrupt")

    @property
    def d_model(self) -> int:
        return self.w_up.shape[1]

    @property
    def d_hidden(self) -> int:
        return self.w_up.shape[0]

    @property
    def gated(self) -> bool:
        return self.w_gate is not None

    def tensors(self) -> dict[str, torch.Tensor]:
        named = {
            "w_up": self.w_up, "w_down": self.w_down, "b_up": self.b_up, "w_gate": self.w_gate,
            "b_gate": self.b_gate, "b_down": self.b_down,
        }  # fmt: skip
        if self.hidden_norm is not None:
            named["norm_weight"], named["norm_bias"] = self.hidden_norm[0], self.hidden_norm[1]
        return {name: tensor for name, tensor in named.items() if tensor is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The dense FFN itself, ``[..., d] -> [..., d]`` (reference for tests)."""
        act = get_activation(self.activation)
        up = F.linear(x, self.w_up, self.b_up)
        hidden = act(up) if self.w_gate is None else act(F.linear(x, self.w_gate, self.b_gate)) * up
        if self.hidden_norm is not None:
            weight, bias, eps = self.hidden_norm
            hidden = F.layer_norm(hidden, hidden.shape[-1:], weight, bias, eps)
        return F.linear(hidden, self.w_down, self.b_down)
