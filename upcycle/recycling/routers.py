"""The router a recycling method attaches, built from the recipe's router section."""

from __future__ import annotations

import torch

from ..layers import MLPRouter, Router, SoftMoERouter, TopKRouter, build_router


def build_recipe_router(config, d_model: int, num_experts: int, generator: torch.Generator, **overrides) -> Router:
    """``config`` is a ConvertConfig. Router weights are drawn from ``generator`` so conversions are reproducible."""
    rc = config.router
    if rc.type == "soft":
        return soft_router(d_model, num_experts, rc.slots_per_expert, generator)
    arguments = {
        "top_k": config.top_k, "renormalize": rc.renormalize, "noise_std": rc.noise_std,
        "capacity_factor": rc.capacity_factor, "init": "zero",
    }  # fmt: skip
    router = TopKRouter(d_model, num_experts, **{**arguments, **overrides})
    if rc.init == "normal":
        with torch.no_grad():
            router.gate.weight.copy_(torch.randn(router.gate.weight.shape, generator=generator) * rc.init_std)
    return router


def soft_router(d_model: int, num_experts: int, slots_per_expert: int, generator: torch.Generator) -> SoftMoERouter:
    router = SoftMoERouter(d_model, num_experts, slots_per_expert=slots_per_expert)
    with torch.no_grad():
        router.slot_queries.copy_(torch.randn(router.slot_queries.shape, generator=generator) * d_model**-0.5)
    return router


def mlp_router(name: str, d_model: int, num_experts: int, generator: torch.Generator, **arguments) -> MLPRouter:
    """A D2DMoE / MoEfication router MLP (``"dynamic_k"`` or ``"moefication"``), weights drawn from ``generator``."""
    router = build_router(name, d_model=d_model, num_experts=num_experts, **arguments)
    router.initialize(generator)
    return router
