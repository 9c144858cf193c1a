"""Routers, registered by name: ``build_router("topk", d_model=..., num_experts=..., top_k=2)``."""

from . import sigmoid, soft, soft_attention, topk  # noqa: F401  (registration side effect)
from .base import Router, build_router, list_routers, register_router
from .mlp import MLPRouter
from .sigmoid import SigmoidRouter
from .soft import SoftMoERouter
from .soft_attention import SoftAttentionRouter
from .topk import TopKRouter

__all__ = [
    "MLPRouter",
    "Router",
    "SigmoidRouter",
    "SoftAttentionRouter",
    "SoftMoERouter",
    "TopKRouter",
    "build_router",
    "list_routers",
    "register_router",
]
