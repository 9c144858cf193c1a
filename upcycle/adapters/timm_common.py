"""What the timm adapters share: MLP kinds, the hidden LayerNorm, and rebuild through timm's registry."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..record import ConversionRecord, attach_record, record_of
from .base import tensor_or_none


def mlp_kind(module: nn.Module | None) -> str | None:
    """ "mlp" (fc1, act, fc2), "swiglu" (fc1_g, fc1_x), "glu" (GluMlp: packed fc1) or None."""
    if module is None:
        return None
    if all(hasattr(module, a) for a in ("fc1_g", "fc1_x", "fc2", "act")):
        return "swiglu"
    if all(hasattr(module, a) for a in ("fc1", "fc2", "act")):
        if hasattr(module, "grn"):
            return None  # GlobalResponseNormMlp (ConvNeXt-V2) mixes spatial positions: not a per-token FFN
        return "glu" if hasattr(module, "chunk_dim") else "mlp"
    return None


def hidden_norm_of(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    if isinstance(norm, nn.Identity):
        return None
    if isinstance(norm, nn.LayerNorm) and norm.weight is not None:
        bias = tensor_or_none(norm, "bias")
        return norm.weight.detach(), torch.zeros_like(norm.weight) if bias is None else bias, norm.eps
    raise ValueError(f"hidden norm {type(norm).__name__} inside the MLP is not supported (only LayerNorm)")


def infer_timm_kwargs(model: nn.Module) -> dict:
    """The ``timm.create_model`` keyword arguments most often customised, read off a built model.

    Covers ViT/DeiT/EVA sizes (image, patch, width, depth, heads, MLP ratio, class token, pooling) and ConvNeXt
    (depths, dims, conv MLP). A model upcycle built (``timm:ARCH``, ``upcycle.load``) records its exact creation
    arguments instead; ``upcycle.save`` checks that the rebuilt skeleton matches every tensor before writing.
    """
    kwargs: dict = {"num_classes": model.num_classes}
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and hasattr(patch_embed, "proj"):
        kwargs["img_size"] = list(patch_embed.img_size)
        kwargs["patch_size"] = list(patch_embed.patch_size)
        kwargs["in_chans"] = patch_embed.proj.in_channels
        kwargs["embed_dim"] = model.embed_dim
        kwargs["depth"] = len(model.blocks)
        kwargs["num_heads"] = model.blocks[0].attn.num_heads
        mlp = model.blocks[0].mlp
        if mlp_kind(mlp) == "mlp" and isinstance(mlp.fc1, nn.Linear):
            kwargs["mlp_ratio"] = mlp.fc1.out_features / model.embed_dim
        if hasattr(model, "global_pool") and isinstance(model.global_pool, str):
            kwargs["global_pool"] = model.global_pool
        if type(model).__name__ == "VisionTransformer":
            kwargs["class_token"] = model.cls_token is not None
    elif type(model).__name__ == "ConvNeXt":
        kwargs["depths"] = [len(stage.blocks) for stage in model.stages]
        kwargs["dims"] = [stage.blocks[0].mlp.fc2.out_channels if isinstance(stage.blocks[0].mlp.fc2, nn.Conv2d)
                          else stage.blocks[0].mlp.fc2.out_features for stage in model.stages]  # fmt: skip
        kwargs["conv_mlp"] = bool(model.stages[0].blocks[0].use_conv_mlp)
        kwargs["in_chans"] = model.stem[0].in_channels
    return kwargs


class TimmAdapterMixin:
    """Inputs, outputs and rebuild for timm image classifiers."""

    task = "image_classification"
    export_formats = ("timm",)

    def record_activation(self, model: nn.Module, activation: str) -> None:
        description = self.describe(model)
        description["kwargs"] = {**description["kwargs"], "act_layer": activation}  # the creation arguments
        record = record_of(model) or attach_record(model, ConversionRecord())
        record.source = description

    def with_classifier(self, model: nn.Module, num_labels: int) -> nn.Module:
        """timm's own ``reset_classifier`` (a freshly initialised head); the creation arguments note the new size."""
        description = self.describe(model)
        model.reset_classifier(num_labels)
        description["kwargs"] = {**description["kwargs"], "num_classes": num_labels}
        record = record_of(model) or attach_record(model, ConversionRecord())
        record.source = description
        return model

    def example_inputs(self, model: nn.Module, batch: int = 2, generator: torch.Generator | None = None) -> dict:
        config = getattr(model, "pretrained_cfg", {}) or {}
        channels, height, width = config.get("input_size", (3, 224, 224))
        patch_embed = getattr(model, "patch_embed", None)
        if patch_embed is not None and getattr(patch_embed, "img_size", None):
            height, width = patch_embed.img_size
        stem = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)  # patch embedding or CNN stem
        channels = stem.in_channels if stem is not None else channels
        return {"x": torch.randn(batch, channels, height, width, generator=generator)}

    def outputs(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        return model(inputs["x"])

    def describe(self, model: nn.Module) -> dict:
        """``timm.create_model``'s architecture and keyword arguments: as recorded when upcycle built the model,
        else read off the model."""
        record = record_of(model)
        if record is not None and record.source is not None:
            return copy.deepcopy(record.source)
        arch = (getattr(model, "pretrained_cfg", {}) or {}).get("architecture")
        if not arch:
            raise ValueError("cannot tell which timm architecture this model is; build it with timm.create_model")
        return {"arch": arch, "kwargs": infer_timm_kwargs(model)}

    def rebuild(self, description: dict) -> nn.Module:
        import timm

        model = timm.create_model(description["arch"], pretrained=False, **description.get("kwargs", {}))
        attach_record(model, ConversionRecord(source=copy.deepcopy(description)))  # exactly how it was created
        return model
