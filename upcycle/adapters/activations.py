"""Map a model's activation (a module instance or a Hugging Face ``hidden_act`` string) to upcycle's names."""

from __future__ import annotations

from torch import nn

from ..layers.activations import ACTIVATIONS

HF_ACTIVATIONS = {
    "gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu", "quick_gelu": "quick_gelu",
    "relu2": "relu2",
}  # fmt: skip


def from_hf(name: str) -> str:
    try:
        return HF_ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation {name!r} is not supported; supported: {sorted(HF_ACTIVATIONS)}") from None


def from_module(module: nn.Module) -> str:
    """nn.GELU / timm GELU, GELUTanh, QuickGELU, nn.SiLU / Swish, nn.ReLU."""
    kind = type(module).__name__
    if kind == "GELU":
        return "gelu_tanh" if getattr(module, "approximate", "none") == "tanh" else "gelu"
    names = {"GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu", "SiLU": "silu", "Swish": "silu", "ReLU": "relu"}
    if kind in names:
        return names[kind]
    raise ValueError(f"FFN activation {kind} is not supported; supported: {sorted(ACTIVATIONS)}")
