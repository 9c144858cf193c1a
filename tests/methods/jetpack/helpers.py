"""Tiny ViTs for the ``moe_jetpack`` tests and the conversion they go through."""

import upcycle
from upcycle.pretrain import build_dense

VIT = {"img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 2, "num_classes": 10}  # 16 patches + class token


def vit(width: int, seed: int = 0, **kwargs):
    return build_dense("timm:vit_tiny_patch16_224", seed=seed, **{**VIT, "embed_dim": width, "num_heads": 2, **kwargs})


def jetpack(model, predecessor=None, **options):
    """``model`` converted by MoE Jetpack (calibrated on 24 digits images, MoE in the last half of the blocks)."""
    options = {"calibration_data": "digits", "calibration_images": 24, "layers": "last_half", **options}
    return upcycle.convert(model, "moe_jetpack", predecessor=None if predecessor is None else str(predecessor),
                           progress=False, **options)  # fmt: skip
