"""Tiny dense models built once for the eval tests (building is the slow part); tests that change one copy it."""

import pytest
import torch

from tests.conversion.tiny_models import build


@pytest.fixture(scope="session")
def dense_llama():
    torch.manual_seed(0)
    return build("llama")


@pytest.fixture(scope="session")
def dense_vit():
    torch.manual_seed(0)
    return build("vit")
