"""Activations by name, so a saved model records a string rather than a Python object."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2 "gelu_new", timm "gelu_tanh"
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),  # squared ReLU (Primer; Nemotron)
    "silu": F.silu,  # SwiGLU's gate activation
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "hard_swish": F.hardswish,  # MobileNetV3's x·relu6(x + 3)/6, LeViT's FFN activation
    "identity": lambda x: x,
}


# the same functions overwriting their input: expert backends use them when autograd records nothing (inference),
# which saves one hidden-sized temporary per projection; the others fall back to the out-of-place function
IN_PLACE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": torch.ops.aten.gelu_,
    "gelu_tanh": lambda x: torch.ops.aten.gelu_(x, approximate="tanh"),
    "relu": torch.relu_,
    "silu": lambda x: F.silu(x, inplace=True),
    "hard_swish": lambda x: F.hardswish(x, inplace=True),
    "identity": lambda x: x,
}


def get_activation(name: str, inplace: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation called ``name``; ``inplace=True``: a version that may overwrite its input (only call it where
    autograd does not need that input)."""
    try:
        function = ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None
    return IN_PLACE.get(name, function) if inplace else function


# Hugging Face ``hidden_act`` / ``activation_function`` strings -> upcycle's names (plain strings: no transformers
# import, so the layer core stays pure torch)
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
