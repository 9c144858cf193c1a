"""Neuron split with a router trained apart from the backbone: D2DMoE (Szatkowski et al., arXiv 2310.04361) and its
baseline MoEfication (Zhang et al., arXiv 2110.01786).

Both cut each FFN into E equal experts exactly as ``neuron_split`` does (balanced k-means on W_up rows, W_down's
bias shared), so with every expert running the layer equals the dense FFN. They differ in the router:
  - ``d2dmoe``: a dynamic-k router, an MLP predicting each expert's output norm; expert i runs iff
    ``r_i >= τ·max_j r_j`` (τ = 0: every expert);
  - ``moefication``: an MLP scoring each expert (tanh by default, as MoEfication's code), a fixed top-k (``top_k``
    of the recipe) at inference.
The router MLPs start random (drawn from the conversion generator); the router stage (``train`` with
``aux.router_fit > 0`` and ``freeze: all_but_routers``) fits them to the experts' measured outputs.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ...adapters.dense_ffn import DenseFFN
from ...layers import MoE
from ...recycling import register_method
from ...recycling.routers import seeded_router
from .split import NeuronSplitOptions, split_experts, split_moe


class MLPRouterOptions(NeuronSplitOptions):
    router_hidden: int = Field(128, ge=1, description="hidden width of the router MLP d -> hidden -> e")


class MoEficationOptions(MLPRouterOptions):
    router_activation: Literal["tanh", "relu"] = Field(
        "tanh", description="router MLP hidden activation: tanh (MoEfication's code and D2DMoE's baseline) or relu"
    )
    router_targets: Literal["batch_max", "token_max"] = Field(
        "batch_max", description="BCE targets: expert activation sums over the batch's largest sum (the released "
        "codes) or over the token's largest sum",
    )  # fmt: skip


class D2DMoEOptions(MLPRouterOptions):
    tau: float = Field(0.0, ge=0, le=1, description="dynamic-k threshold: expert i runs iff r_i >= tau * max r")
    zero_runs_all: bool = Field(False, description="tau > 0: a token predicted 0 for every expert runs all of them "
                                "(the authors' code) instead of none")  # fmt: skip


def _split_with_mlp_router(dense: DenseFFN, config, generator: torch.Generator, options: MLPRouterOptions,
                           router: str, **router_args) -> MoE:  # fmt: skip
    """The neuron split, then the named MLP router (drawn after the partition, from the same generator)."""
    if config.router.type != "topk":
        raise ValueError(
            f"method {config.method!r} builds its own router MLP; router type {config.router.type!r} does not apply "
            "(leave the router section at its default)"
        )
    experts, groups = split_experts(dense, config.num_experts, options, generator)
    mlp = seeded_router(router, dense.d_model, config.num_experts, generator, hidden=options.router_hidden,
                     **router_args)  # fmt: skip
    return split_moe(mlp, experts, groups)


@register_method(
    "d2dmoe",
    paper="https://arxiv.org/abs/2310.04361",
    description="neuron split + an MLP router predicting each expert's output norm; per-token dynamic-k (tau)",
    options=D2DMoEOptions,
)
@torch.no_grad()
def d2dmoe(dense: DenseFFN, config, generator: torch.Generator) -> MoE:
    options = D2DMoEOptions(**config.options)
    return _split_with_mlp_router(dense, config, generator, options, "dynamic_k", tau=options.tau,
                                  zero_runs_all=options.zero_runs_all)  # fmt: skip


@register_method(
    "moefication",
    paper="https://arxiv.org/abs/2110.01786",
    description="neuron split + an MLP router scoring each expert; fixed top-k of unweighted experts",
    options=MoEficationOptions,
)
@torch.no_grad()
def moefication(dense: DenseFFN, config, generator: torch.Generator) -> MoE:
    options = MoEficationOptions(**config.options)
    return _split_with_mlp_router(dense, config, generator, options, "moefication", top_k=config.top_k,
                                  activation=options.router_activation, targets=options.router_targets)  # fmt: skip
