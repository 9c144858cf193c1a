"""The backend registry: name -> compute function."""

from __future__ import annotations

from collections.abc import Callable

_BACKENDS: dict[str, Callable] = {}


def register_backend(name: str) -> Callable[[Callable], Callable]:
    def decorator(fn: Callable) -> Callable:
        if name in _BACKENDS:
            raise ValueError(f"backend {name!r} is registered twice")
        _BACKENDS[name] = fn
        return fn

    return decorator


def get_backend(name: str) -> Callable:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown expert backend {name!r}; registered: {list_backends()}") from None


def list_backends() -> list[str]:
    return sorted(_BACKENDS)
