"""The 2x wider predecessor of the ``moe_jetpack`` tests' tiny ViT, saved once per module."""

import pytest

import upcycle
from tests.methods.jetpack.helpers import vit


@pytest.fixture(scope="module")
def predecessor(tmp_path_factory):
    path = tmp_path_factory.mktemp("jetpack") / "wide"
    upcycle.save(vit(64, seed=1), path)
    return path
