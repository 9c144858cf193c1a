"""Recycling methods: dense FFN weights -> an MoE layer. Each is a small registered function with its paper.

A method has the signature ``fn(dense: DenseFFN, config: ConvertConfig, generator: torch.Generator) -> MoE`` and
may register a pydantic model for its options (``config.options``), which the config validates. A method that
needs to look at the whole model first (calibration statistics, a predecessor checkpoint) registers ``prepare``:
``prepare(model, adapter, sites, config) -> [context per site]``, and then receives ``context=`` per layer. One
that changes the model outside its FFNs once they are replaced (MoE Jetpack's readout) registers ``finish``:
``finish(model, adapter, config, description) -> (description, dropped tensor names)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel

from ..registry import Registry


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable
    paper: str
    description: str
    options_model: type[BaseModel] | None
    prepare: Callable | None = None
    finish: Callable | None = None


METHODS: Registry[Method] = Registry("recycling method")


def register_method(name: str, paper: str, description: str, options: type[BaseModel] | None = None,
                    prepare: Callable | None = None, finish: Callable | None = None):  # fmt: skip
    def decorator(fn: Callable) -> Callable:
        METHODS.add(name, Method(name, fn, paper, description, options, prepare, finish), description, paper)
        return fn

    return decorator


def get_method(name: str) -> Method:
    return METHODS.get(name)


def list_methods() -> list[dict[str, str]]:
    """Every registered method with its paper URL and a one-line description."""
    return [{"name": e.name, "paper": e.paper, "description": e.description} for e in METHODS.entries()]


__all__ = ["Method", "get_method", "list_methods", "register_method"]
