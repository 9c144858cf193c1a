"""The router a recycling method attaches, built from the recipe's router section: any registered router."""

from __future__ import annotations

import inspect

import torch

from ..layers import Router, build_router
from ..layers.routers.base import ROUTERS
from ..registry import Registry

# how a new router's rows start (recipe router.init, --router-init); "data" is filled in after the conversion
ROUTER_INITS: Registry[str] = Registry("router init")
ROUTER_INITS.add("zero", "zero", "all-zero rows: every expert equally likely at step 0")
ROUTER_INITS.add("normal", "normal", "rows drawn from N(0, init_std²), the usual random start")
ROUTER_INITS.add("data", "data", "rows from calibration activations: cluster centroids for upcycling, each expert's "
                 "domain mean for merges (mergekit's hidden-state gates); upcycle.init_routers_from_data")  # fmt: skip


def router_arguments(name: str) -> list[str]:
    """The constructor arguments of router ``name`` a recipe can set (besides its width and expert count)."""
    parameters = inspect.signature(ROUTERS.get(name).__init__).parameters
    return [p for p in parameters if p not in ("self", "d_model", "num_experts")]


def build_recipe_router(config, d_model: int, num_experts: int, generator: torch.Generator, **overrides) -> Router:
    """The recipe's router (``config`` is a ConvertConfig): ``router.type`` names any registered router; the
    recipe's ``top_k`` and router fields, then ``router.options`` and a method's ``overrides``, go to its constructor
    where it takes them. Its weights are drawn from ``generator`` so conversions are reproducible."""
    rc = config.router
    accepted = router_arguments(rc.type)
    offered = {
        "top_k": config.top_k, "renormalize": rc.renormalize, "noise_std": rc.noise_std,
        "capacity_factor": rc.capacity_factor, "slots_per_expert": rc.slots_per_expert,
        "init": "zero",  # a constructor that can skip its own random draw does: initialize() draws the weights
        **rc.options, **overrides,
    }  # fmt: skip
    router = build_router(rc.type, d_model=d_model, num_experts=num_experts,
                          **{key: value for key, value in offered.items() if key in accepted})  # fmt: skip
    # init "data" draws normal rows first: tied rows stay recognisable when the data replaces them after conversion
    router.initialize(generator, 0.0 if rc.init == "zero" else rc.init_std)
    return router


def seeded_router(name: str, d_model: int, num_experts: int, generator: torch.Generator, **arguments) -> Router:
    """A router a method builds itself (D2DMoE's MLP routers, Jetpack's slot routers), drawn from ``generator``."""
    router = build_router(name, d_model=d_model, num_experts=num_experts, **arguments)
    router.initialize(generator)
    return router
