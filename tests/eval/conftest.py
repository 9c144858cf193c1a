"""Tiny dense models built once for the eval tests (building is the slow part); tests that change one copy it."""

import pytest
import torch

from tests.conversion.tiny_models import build
from upcycle.sources import load_timm

TINY_GREY_VIT = {"img_size": 8, "patch_size": 4, "in_chans": 1, "embed_dim": 16, "depth": 1, "num_heads": 2,
                 "num_classes": 10}  # fmt: skip


@pytest.fixture(scope="session")
def dense_llama():
    torch.manual_seed(0)
    return build("llama")


@pytest.fixture(scope="session")
def dense_vit():
    torch.manual_seed(0)
    return build("vit")


@pytest.fixture(scope="module")
def vit():
    """A ViT for 8×8 grey images in 10 classes (the digits), read as a ``timm:ARCH`` source, so it carries the record
    that source gives."""
    return load_timm("vit_tiny_patch16_224", None, False, TINY_GREY_VIT)
