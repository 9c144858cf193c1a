"""Router base class and registry. A router maps tokens to a :class:`~upcycle.layers.routing.Routing`.

``kind`` says which input layout a router reads: ``"sparse"`` routers see tokens flattened to ``[t, d]``;
``"slots"`` routers see examples ``[b, n, d]`` because their softmax runs over the tokens of one example.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ...registry import Registry

ROUTERS: Registry[type[Router]] = Registry("router")


class Router(nn.Module):
    kind: str = "sparse"
    # True when the logits are gate(x) with one row of ``self.gate`` per expert (top-k, sigmoid): a row then says
    # where the expert's tokens lie, and upcycle.init_routers_from_data can set it
    linear_logits: bool = False
    # True when every token uses exactly ``top_k`` experts (active-parameter counts read k from the router)
    fixed_k: bool = False

    def __init__(self, d_model: int, num_experts: int):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if d_model < 1:
            raise ValueError(f"d_model must be >= 1, got {d_model}")
        self.d_model, self.num_experts = d_model, num_experts
        self._spec: dict = {"d_model": d_model, "num_experts": num_experts}  # subclasses record all their arguments

    def spec(self) -> dict:
        """Registry name and constructor arguments that rebuild this router's structure."""
        return {"name": self.registry_name, **self._spec}

    @torch.no_grad()
    def initialize(self, generator: torch.Generator, std: float) -> None:
        """Draw the router's weights from ``generator`` (a conversion is reproducible): every weight matrix from
        N(0, std²), zeros when ``std`` is 0; biases zero. Routers with their own scheme override it."""
        for name, parameter in self.named_parameters():
            if parameter.ndim >= 2 and std > 0:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
            elif parameter.ndim >= 2 or name.endswith("bias"):
                parameter.zero_()


def register_router(name: str, description: str | None = None, paper: str | None = None) -> Callable:
    """Class decorator; the description and paper default to the module docstring's first sentence and arXiv id."""

    def decorator(cls: type[Router]) -> type[Router]:
        ROUTERS.add(name, cls, description, paper)
        cls.registry_name = name
        return cls

    return decorator


def build_router(name: str, **kwargs) -> Router:
    return ROUTERS.get(name)(**kwargs)


def list_routers() -> list[str]:
    return ROUTERS.names()
