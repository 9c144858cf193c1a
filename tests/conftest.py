import os

# The test configuration, not the library, sets these (``import upcycle`` changes no environment variable): before
# anything imports a Hugging Face library, which reads them once. No hub is reachable here; every model and dataset
# the tests use is built in-session or read from a local folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest
import torch

import upcycle  # noqa: F401  (the torchvision fix, where a CPU torch needs it, before any test imports timm)


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
