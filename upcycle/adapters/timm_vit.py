"""timm ViT family: VisionTransformer (ViT, DeiT), Eva (EVA-02) and other models whose ``blocks[i].mlp`` is a timm
``Mlp``, ``SwiGLU`` or ``GluMlp`` (``SwiGLUPacked``). Tokens are ``[b, n, d]``; the FFN is channels-last.

A ViT whose attention projections were replaced by ReLU MLPs (D2DMoE §3.4, :mod:`.timm_vit_projections`) has those
MLPs as FFN sites too, in forward order per block: ``attn.qkv.q``, ``.k``, ``.v``, ``attn.proj``, ``mlp``.
Its description records the MLP width, and the rebuild replaces the projections again.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .base import Adapter, FFNSite, register_adapter
from .dense_ffn import DenseFFN
from .timm_common import TimmAdapterMixin, mlp_kind, read_timm_mlp
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
            and not hasattr(model, "cls_attn_blocks")  # XCiT: its class-attention MLPs are FFNs too (timm_xcit)
        )

    def ffn_sites(self, model: nn.Module) -> list[FFNSite]:
        names = []
        for i, block in enumerate(model.blocks):
            if has_mlp_projections(block):
                names += [f"blocks.{i}.attn.{projection}" for projection in PROJECTIONS]
            names.append(f"blocks.{i}.mlp")
        return [FFNSite(index, name) for index, name in enumerate(names)]

    def read_ffn(self, model: nn.Module, site: FFNSite) -> DenseFFN:
        return read_timm_mlp(model.get_submodule(site.name), site.name)

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

    def mean_pool_readout(self, model: nn.Module) -> tuple[dict, list[str]]:
        """As timm builds a ViT with ``global_pool='avg'``: the patch tokens averaged into a fresh ``fc_norm`` and
        no final ``norm``, so the saved model rebuilds by name with that keyword."""
        norm, fc_norm = getattr(model, "norm", None), getattr(model, "fc_norm", None)
        if not isinstance(norm, nn.LayerNorm) or not isinstance(fc_norm, nn.Identity):
            raise ValueError("a mean-pool readout replaces a ViT's class-token readout (a final LayerNorm, no "
                             "fc_norm); this model has none: use readout=class_token")  # fmt: skip
        fresh = copy.deepcopy(norm)  # same class, width and eps as timm's norm_layer gives fc_norm
        fresh.reset_parameters()
        model.fc_norm, model.norm, model.global_pool = fresh, nn.Identity(), "avg"
        return {"global_pool": "avg"}, ["norm.weight", "norm.bias"]

    def replace_attention_projections(self, model: nn.Module, hidden_ratio: float = 0.5,
                                      generator: torch.Generator | None = None) -> nn.Module:  # fmt: skip
        return replace_attention_projections(model, hidden_ratio, generator)

    def attention_projection_pairs(self, model: nn.Module, teacher: nn.Module) -> list[tuple]:
        return projection_pairs(model, teacher)
