"""Map a model's activation module (torch, timm) to upcycle's activation names."""

from __future__ import annotations

from torch import nn

from ..layers.activations import ACTIVATIONS


def from_module(module: nn.Module) -> str:
    """nn.GELU / timm GELU, GELUTanh, QuickGELU, nn.SiLU / Swish, nn.ReLU, nn.Hardswish / timm HardSwish."""
    kind = type(module).__name__
    if kind == "GELU":
        return "gelu_tanh" if getattr(module, "approximate", "none") == "tanh" else "gelu"
    names = {"GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu", "SiLU": "silu", "Swish": "silu", "ReLU": "relu",
             "Hardswish": "hard_swish", "HardSwish": "hard_swish"}  # fmt: skip
    if kind in names:
        return names[kind]
    raise ValueError(f"FFN activation {kind} is not supported; supported: {sorted(ACTIVATIONS)}")
