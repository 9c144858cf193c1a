"""The backend registry: name -> compute function; each backend's description is its module's first sentence."""

from __future__ import annotations

from collections.abc import Callable

from ...registry import Registry

BACKENDS: Registry[Callable] = Registry("expert backend")


def register_backend(name: str) -> Callable[[Callable], Callable]:
    return BACKENDS.register(name)


def get_backend(name: str) -> Callable:
    return BACKENDS.get(name)


def list_backends() -> list[str]:
    return BACKENDS.names()
