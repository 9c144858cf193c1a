"""MoE layer core, pure torch (no timm / transformers imports): routing record, routers, stacked experts (plain,
or SpheroMoE's dual-path core/universal groups) and their compute backends, the MoE layer, entmax-1.5, aux losses,
routing statistics."""

from .backends import get_backend, list_backends, register_backend
from .dual_experts import DualPathExperts
from .entmax import entmax15
from .experts import Experts, ExpertStatistics
from .ffn import FFN
from .losses import hoyer_sparsity, l1_sparsity, load_balancing_loss, router_z_loss
from .moe import MoE, build_moe, collect_aux_losses, describe_moe, moe_layers, set_backend, set_tau, set_top_k
from .real_tokens import real_tokens
from .routers import (
    MLPRouter,
    Router,
    SoftMoERouter,
    TopKRouter,
    build_router,
    list_routers,
    register_router,
)
from .routers.balancing import update_expert_biases
from .routing import Routing
from .statistics import routing_statistics

__all__ = [
    "FFN",
    "DualPathExperts",
    "ExpertStatistics",
    "Experts",
    "MLPRouter",
    "MoE",
    "Router",
    "Routing",
    "SoftMoERouter",
    "TopKRouter",
    "build_moe",
    "build_router",
    "collect_aux_losses",
    "describe_moe",
    "entmax15",
    "get_backend",
    "hoyer_sparsity",
    "l1_sparsity",
    "list_backends",
    "list_routers",
    "load_balancing_loss",
    "moe_layers",
    "real_tokens",
    "register_backend",
    "register_router",
    "router_z_loss",
    "routing_statistics",
    "set_backend",
    "set_tau",
    "set_top_k",
    "update_expert_biases",
]
