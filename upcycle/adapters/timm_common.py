"""What the timm adapters share: MLP kinds, the hidden LayerNorm, BatchNorm folding, the no-silent-drop check of an
FFN's tensors, the refusal of models without a per-token FFN, and rebuild through timm's registry."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from ..errors import UserError
from ..record import ConversionRecord, attach_record, record_of
from .activations import from_module
from .base import tensor_or_none
from .dense_ffn import DenseFFN


def mlp_kind(module: nn.Module | None) -> str | None:
    """ "mlp" (fc1, act, fc2), "swiglu" (fc1_g, fc1_x), "glu" (GluMlp: packed fc1) or None."""
    if module is None:
        return None
    if all(hasattr(module, a) for a in ("fc1_g", "fc1_x", "fc2", "act")):
        return "swiglu"
    if all(hasattr(module, a) for a in ("fc1", "fc2", "act")):
        if hasattr(module, "grn"):
            return None  # GlobalResponseNormMlp (ConvNeXt-V2) mixes spatial positions: not a per-token FFN
        if not isinstance(getattr(module, "gate", nn.Identity()), nn.Identity):
            return None  # GatedMlp with gMLP's spatial gating unit mixes tokens between fc1 and fc2
        if not hasattr(module, "norm"):  # every timm Mlp has one (an Identity at least); not so other designs:
            return None  # PVT-v2's depthwise conv between fc1 and fc2, EfficientFormer's BatchNorms (its adapter's)
        return "glu" if hasattr(module, "chunk_dim") else "mlp"
    return None


def hidden_norm_of(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    if isinstance(norm, nn.Identity):
        return None
    if isinstance(norm, nn.LayerNorm) and norm.weight is not None:
        bias = tensor_or_none(norm, "bias")
        return norm.weight.detach(), torch.zeros_like(norm.weight) if bias is None else bias, norm.eps
    raise ValueError(f"hidden norm {type(norm).__name__} inside the MLP is not supported (only LayerNorm)")


def read_timm_mlp(mlp: nn.Module, name: str = "mlp") -> DenseFFN:
    """timm Mlp (Linear or 1×1 Conv2d), SwiGLU (fc1_g gate, fc1_x up) or GluMlp (fc1 packs both halves); every
    tensor of ``mlp`` (at ``name``) must be one of those read, else the conversion stops naming it."""
    kind = mlp_kind(mlp)
    if kind is None:
        raise ValueError(f"{type(mlp).__name__} is not a supported timm MLP (Mlp, SwiGLU, GluMlp)")
    check_mapped(mlp, name, module_tensors(mlp, *(("fc1_g", "fc1_x") if kind == "swiglu" else ("fc1",)), "fc2", "norm"))
    activation = from_module(mlp.act)
    norm = hidden_norm_of(mlp.norm)
    w_down, b_down = linear_weight(mlp.fc2), tensor_or_none(mlp.fc2, "bias")
    if kind == "mlp":
        return DenseFFN(linear_weight(mlp.fc1), w_down, activation, tensor_or_none(mlp.fc1, "bias"), b_down=b_down,
                        hidden_norm=norm)  # fmt: skip
    if kind == "swiglu":
        return DenseFFN(
            linear_weight(mlp.fc1_x), w_down, activation, tensor_or_none(mlp.fc1_x, "bias"),
            linear_weight(mlp.fc1_g), tensor_or_none(mlp.fc1_g, "bias"), b_down, norm,
        )  # fmt: skip
    # GluMlp: fc1 output chunks (x1, x2); gate_last: x1 * act(x2), else act(x1) * x2
    w1, b1 = linear_weight(mlp.fc1), tensor_or_none(mlp.fc1, "bias")
    first, second = w1.chunk(2, dim=0)
    b_first, b_second = (None, None) if b1 is None else b1.chunk(2)
    if mlp.gate_last:
        return DenseFFN(first, w_down, activation, b_first, second, b_second, b_down, norm)
    return DenseFFN(second, w_down, activation, b_second, first, b_first, b_down, norm)


def linear_weight(layer: nn.Module) -> torch.Tensor:
    """Linear ``[out, in]``; a 1×1 Conv2d ``[out, in, 1, 1]`` viewed as ``[out, in]``."""
    weight = layer.weight.detach()
    if weight.ndim == 4:
        if weight.shape[2:] != (1, 1):
            raise ValueError(f"only 1×1 convolutions are FFN layers, got kernel {tuple(weight.shape[2:])}")
        weight = weight[:, :, 0, 0]
    return weight


def check_mapped(module: nn.Module, name: str, mapped: Iterable[str], dropped: Iterable[str] = ()) -> None:
    """No silent drops: every tensor of the FFN ``module`` (at ``name``) is read into the experts (``mapped``) or
    deliberately left out (``dropped``); any other would vanish with the module, so the conversion stops naming it."""
    left = sorted(set(module.state_dict()) - set(mapped) - set(dropped))
    if left:
        raise UserError(
            f"{name} ({type(module).__name__}) holds tensors the experts would not carry: "
            + ", ".join(f"{name}.{tensor}" for tensor in left)
            + "; upcycle has no mapping for this FFN variant"
        )


def module_tensors(module: nn.Module, *children: str) -> set[str]:
    """The state-dict names of ``module``'s ``children`` (what a reader consumed), relative to ``module``."""
    return {f"{child}.{key}" for child in children for key in getattr(module, child).state_dict()}


def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.Module, name: str):
    """``bn(x @ weight.T + bias)`` in eval mode as one affine map ``(weight' [o, i], bias' [o])``.

    BatchNorm with running statistics is a per-channel scale γ/√(σ² + ε) and shift β - μ·scale at inference, so it
    folds into the preceding linear layer exactly (timm's LeViT ``fuse()`` does the same). The folded expert has no
    BatchNorm left: in training it no longer normalises by batch statistics. Maps the BN's weight, bias and running
    statistics; its ``num_batches_tracked`` (a step counter) is dropped.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise UserError(f"{name}: a BatchNorm without running statistics normalises every batch by its own "
                        "statistics, which no fixed linear layer reproduces")  # fmt: skip
    mean, var = bn.running_mean.detach(), bn.running_var.detach()
    gamma = torch.ones_like(var) if bn.weight is None else bn.weight.detach()
    beta = torch.zeros_like(var) if bn.bias is None else bn.bias.detach()
    scale = gamma / torch.sqrt(var + bn.eps)  # [o]
    shifted = -mean if bias is None else bias - mean
    return weight * scale[:, None], shifted * scale + beta


def timm_refusal(model: nn.Module) -> str | None:
    """Why a timm model that no adapter matches cannot be converted, when its structure tells: it has no FFN, or its
    only FFNs mix positions; None when it has per-token MLPs in a layout no adapter knows (the generic message)."""
    if not type(model).__module__.startswith("timm."):
        return None
    kind = type(model).__name__
    mlps = [m for m in model.modules() if "Mlp" in type(m).__name__ or mlp_kind(m) is not None]  # timm's naming
    if any(hasattr(m, "dwconv") for m in mlps):
        return (f"timm {kind}: its FFNs (fc1 -> 3x3 depthwise conv -> act -> fc2, PVT v2 arXiv 2106.13797) mix every "
                "position with its neighbours between the two projections, so no per-token expert reproduces them; "
                "upcycle converts per-token FFNs only")  # fmt: skip
    if any(type(getattr(m, "gate", None)).__name__ == "SpatialGatingUnit" for m in mlps):
        return (f"timm {kind}: its channel MLPs hold a spatial gating unit (gMLP, arXiv 2105.08050) that mixes "
                "tokens between fc1 and fc2, so no per-token expert reproduces them; upcycle converts per-token FFNs "
                "only")  # fmt: skip
    if not mlps:
        return (f"timm {kind} has no FFN (no MLP block: its layers are convolutions), so there is nothing to turn "
                "into experts; upcycle converts the MLP blocks of transformer-style models (upcycle.list_adapters() "
                "names the families)")  # fmt: skip
    return None


def infer_timm_kwargs(model: nn.Module) -> dict:
    """The ``timm.create_model`` keyword arguments most often customised, read off a built model.

    Covers ViT/DeiT/EVA sizes (image, patch, width, depth, heads, MLP ratio, class token, pooling) and ConvNeXt
    (depths, dims, conv MLP). A model upcycle built (``timm:ARCH``, ``upcycle.load``) records its exact creation
    arguments instead; ``upcycle.save`` checks that the rebuilt skeleton matches every tensor before writing.
    """
    kwargs: dict = {"num_classes": model.num_classes}
    patch_embed = getattr(model, "patch_embed", None)
    if (
        isinstance(getattr(patch_embed, "proj", None), nn.Conv2d)
        and hasattr(patch_embed, "img_size")
        and hasattr(model, "blocks")
    ):  # a ViT-style patch embedding (XCiT's is a conv stack, Swin's has no blocks list: only their record tells)
        kwargs["img_size"] = list(patch_embed.img_size)
        kwargs["patch_size"] = list(_pair(patch_embed.patch_size))
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


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, tuple | list) else (value, value)


class TimmAdapterMixin:
    """Inputs, outputs and rebuild for timm image classifiers."""

    task = "image_classification"
    export_formats = ("timm",)

    def refusal(self, model: nn.Module) -> str | None:
        return timm_refusal(model)

    def image_size(self, model: nn.Module) -> tuple[int, int]:
        """(H, W) of the images the model takes: its patch embedding's (or patch stem's) when it records one, else
        its pretrained config's. Families whose size lives elsewhere override this."""
        for embed in (getattr(model, "patch_embed", None), getattr(model, "stem", None)):
            if getattr(embed, "img_size", None):
                return tuple(_pair(embed.img_size))
        config = getattr(model, "pretrained_cfg", {}) or {}
        return tuple(config.get("input_size", (3, 224, 224))[1:])

    def record_activation(self, model: nn.Module, activation: str) -> None:
        """Rebuild with ``activation`` in every FFN: noted as ``ffn_activation`` and set on each FFN site after
        ``timm.create_model``, not passed as its ``act_layer``, which Swin and Hiera do not take, MLP-Mixer, XCiT and
        EfficientFormer take only as a class, and LeViT applies to its attention too."""
        description = self.describe(model)
        description["ffn_activation"] = activation
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
        height, width = self.image_size(model)
        stem = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)  # patch embedding or CNN stem
        channels = stem.in_channels if stem is not None else 3
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
        activation = description.get("ffn_activation")
        if activation is not None:
            if activation not in _ACTIVATION_MODULES:
                raise ValueError(f"cannot rebuild timm FFNs with activation {activation!r}; "
                                 f"known: {sorted(_ACTIVATION_MODULES)}")  # fmt: skip
            for site in self.ffn_sites(model):
                setattr(model.get_submodule(site.name), self.activation_attribute, _ACTIVATION_MODULES[activation]())
        attach_record(model, ConversionRecord(source=copy.deepcopy(description)))  # exactly how it was created
        return model


_ACTIVATION_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}  # record_activation's names -> modules
