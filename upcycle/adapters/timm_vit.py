"""timm ViT family: VisionTransformer (ViT, DeiT), Eva (EVA-02) and other models whose ``blocks[i].mlp`` is a timm
``Mlp``, ``SwiGLU`` or ``GluMlp`` (``SwiGLUPacked``). Tokens are ``[b, n, d]``; the FFN is channels-last.

A ViT whose attention projections were replaced by ReLU MLPs (D2DMoE §3.4, :mod:`.timm_vit_projections`) has those
MLPs as FFN sites too, in forward order per block: ``attn.qkv.q``, ``.k``, ``.v``, ``attn.proj``, ``mlp``.
Its description records the MLP width, and the rebuild replaces the projections again.
"""

from __future__ import annotations

import torch
from torch import nn

from .activations import from_module
from .base import Adapter, FFNSite, register_adapter, tensor_or_none
from .dense_ffn import DenseFFN
from .timm_common import TimmAdapterMixin, hidden_norm_of, mlp_kind
from .timm_vit_projections import (
    PROJECTIONS,
    has_mlp_projections,
    projection_hidden,
    projection_pairs,
    replace_attention_projections,
)


@register_adapter
class TimmViTAdapter(TimmAdapterMixin, Adapter):
    name = "timm_vit"
    family = "timm ViT / DeiT / EVA-02 (blocks[i].mlp: Mlp, SwiGLU, SwiGLUPacked)"
    task = "image_classification"

    def matches(self, model: nn.Module) -> bool:
        blocks = getattr(model, "blocks", None)
        return (
            type(model).__module__.startswith("timm.")
            and isinstance(blocks, nn.Sequential | nn.ModuleList)
            and len(blocks) > 0
            and all(mlp_kind(getattr(block, "mlp", None)) is not None for block in blocks)
        )

    def ffn_sites(self, model: nn.Module) -> list[FFNSite]:
        names = []
        for i, block in enumerate(model.blocks):
            if has_mlp_projections(block):
                names += [f"blocks.{i}.attn.{projection}" for projection in PROJECTIONS]
            names.append(f"blocks.{i}.mlp")
        return [FFNSite(index, name) for index, name in enumerate(names)]

    def read_ffn(self, model: nn.Module, site: FFNSite) -> DenseFFN:
        return read_timm_mlp(model.get_submodule(site.name))

    def describe(self, model: nn.Module) -> dict:
        description = super().describe(model)
        hidden = projection_hidden(model)
        if hidden is not None:
            description["attention_projection_hidden"] = hidden
        return description

    def rebuild(self, description: dict) -> nn.Module:
        model = super().rebuild(description)
        if "attention_projection_hidden" in description:
            replace_attention_projections(model, hidden=description["attention_projection_hidden"])
        return model

    def replace_attention_projections(self, model: nn.Module, hidden_ratio: float = 0.5,
                                      generator: torch.Generator | None = None) -> nn.Module:  # fmt: skip
        return replace_attention_projections(model, hidden_ratio, generator)

    def attention_projection_pairs(self, model: nn.Module, teacher: nn.Module) -> list[tuple]:
        return projection_pairs(model, teacher)


def read_timm_mlp(mlp: nn.Module) -> DenseFFN:
    """timm Mlp (Linear or 1×1 Conv2d), SwiGLU (fc1_g gate, fc1_x up) or GluMlp (fc1 packs both halves)."""
    kind = mlp_kind(mlp)
    if kind is None:
        raise ValueError(f"{type(mlp).__name__} is not a supported timm MLP (Mlp, SwiGLU, GluMlp)")
    activation = from_module(mlp.act)
    norm = hidden_norm_of(mlp.norm)
    w_down, b_down = _weight(mlp.fc2), tensor_or_none(mlp.fc2, "bias")
    if kind == "mlp":
        return DenseFFN(_weight(mlp.fc1), w_down, activation, tensor_or_none(mlp.fc1, "bias"), b_down=b_down,
                        hidden_norm=norm)  # fmt: skip
    if kind == "swiglu":
        return DenseFFN(
            _weight(mlp.fc1_x), w_down, activation, tensor_or_none(mlp.fc1_x, "bias"),
            _weight(mlp.fc1_g), tensor_or_none(mlp.fc1_g, "bias"), b_down, norm,
        )  # fmt: skip
    # GluMlp: fc1 output chunks (x1, x2); gate_last: x1 * act(x2), else act(x1) * x2
    w1, b1 = _weight(mlp.fc1), tensor_or_none(mlp.fc1, "bias")
    first, second = w1.chunk(2, dim=0)
    b_first, b_second = (None, None) if b1 is None else b1.chunk(2)
    if mlp.gate_last:
        return DenseFFN(first, w_down, activation, b_first, second, b_second, b_down, norm)
    return DenseFFN(second, w_down, activation, b_second, first, b_first, b_down, norm)


def _weight(layer: nn.Module) -> torch.Tensor:
    """Linear ``[out, in]``; a 1×1 Conv2d ``[out, in, 1, 1]`` viewed as ``[out, in]``."""
    weight = layer.weight.detach()
    if weight.ndim == 4:
        if weight.shape[2:] != (1, 1):
            raise ValueError(f"only 1×1 convolutions are FFN layers, got kernel {tuple(weight.shape[2:])}")
        weight = weight[:, :, 0, 0]
    return weight
