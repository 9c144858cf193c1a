import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports a Hugging Face library

import pytest
import torch

import upcycle  # noqa: F401  (applies the torchvision fix before any test imports timm)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
