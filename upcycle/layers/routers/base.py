"""Router base class and registry. A router maps tokens to a :class:`~upcycle.layers.routing.Routing`.

``kind`` says which input layout a router reads: ``"sparse"`` routers see tokens flattened to ``[t, d]``;
``"slots"`` routers see examples ``[b, n, d]`` because their softmax runs over the tokens of one example.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_ROUTERS: dict[str, type[Router]] = {}


class Router(nn.Module):
    kind: str = "sparse"

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


def register_router(name: str) -> Callable[[type[Router]], type[Router]]:
    def decorator(cls: type[Router]) -> type[Router]:
        if name in _ROUTERS:
            raise ValueError(f"router {name!r} is registered twice")
        cls.registry_name = name
        _ROUTERS[name] = cls
        return cls

    return decorator


def build_router(name: str, **kwargs) -> Router:
    try:
        cls = _ROUTERS[name]
    except KeyError:
        raise ValueError(f"unknown router {name!r}; registered: {list_routers()}") from None
    return cls(**kwargs)


def list_routers() -> list[str]:
    return sorted(_ROUTERS)
