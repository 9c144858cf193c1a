"""Recycling methods: dense FFN weights -> an MoE layer. Each is a small registered function with its paper.

A method has the signature ``fn(dense: DenseFFN, config: ConvertConfig, generator: torch.Generator) -> MoE`` and
may register a pydantic model for its options (``config.options``), which the config validates. A method that
needs to look at the whole model first (calibration statistics, a predecessor checkpoint) registers ``prepare``:
``prepare(model, adapter, sites, config) -> [context per site]``, and then receives ``context=`` per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable
    paper: str
    description: str
    options_model: type[BaseModel] | None
    prepare: Callable | None = None


_METHODS: dict[str, Method] = {}


def register_method(name: str, paper: str, description: str, options: type[BaseModel] | None = None,
                    prepare: Callable | None = None):  # fmt: skip
    def decorator(fn: Callable) -> Callable:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        _METHODS[name] = Method(name, fn, paper, description, options, prepare)
        return fn

    return decorator


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered: {sorted(_METHODS)}") from None


def list_methods() -> list[dict[str, str]]:
    """Every registered method with its paper URL and a one-line description."""
    return [
        {"name": m.name, "paper": m.paper, "description": m.description}
        for m in sorted(_METHODS.values(), key=lambda m: m.name)
    ]


__all__ = ["Method", "get_method", "list_methods", "register_method"]
