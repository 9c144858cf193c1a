"""Routers, registered by name: ``build_router("topk", d_model=..., num_experts=..., top_k=2)``."""

from . import dynamic_k, moefication, soft, soft_attention, sphero, topk  # noqa: F401  (registration side effect)
from .base import Router, build_router, list_routers, register_router
from .dynamic_k import DynamicKRouter
from .mlp import MLPRouter
from .moefication import MoEficationRouter
from .soft import SoftMoERouter
from .soft_attention import SoftAttentionRouter
from .sphero import SpheroMoERouter
from .topk import TopKRouter

__all__ = [
    "DynamicKRouter",
    "MLPRouter",
    "MoEficationRouter",
    "Router",
    "SoftAttentionRouter",
    "SoftMoERouter",
    "SpheroMoERouter",
    "TopKRouter",
    "build_router",
    "list_routers",
    "register_router",
]
