"""CMoE (Pei et al., "CMoE: Fast Carving of Mixture-of-Experts for Efficient LLM Inference", arXiv 2502.04416):
a dense FFN carved, without training, into always-on shared experts and routed experts from activation statistics on
a few calibration tokens, under an analytic router (:mod:`.router`), usable as is and fine-tunable after.

The h hidden units are cut into N = N_s + N_r experts of m = ⌊h / N⌋ units (:mod:`.carving`): the N_s·m units most
often among a token's K_a largest activations form one shared FFN (N_s shared experts side by side are one FFN);
the rest are clustered into N_r = ``num_experts`` routed experts of exactly m units by balanced k-means on their
activation markers, so units that fire on the same tokens share an expert. When N does not divide h, the remainder
units go to the shared expert (the released code would drop them). Each routed expert is the dense FFN restricted to
its units; the router scores it by its representative unit's activation and sums the chosen experts with weight 1:

    MoE(x) = shared(x) + Σ_{j chosen} expert_j(x)      = FFN(x) when every routed expert is chosen

(``upcycle.verify`` checks it with top_k = num_experts); with top-k < N_r the layer keeps the shared units and the
chosen groups, a (N_s·m + k·m) / h share of the FFN per token. b_down belongs to no unit: the shared expert carries
it (a shared bias of the routed experts when there is no shared unit). The dense units each part holds are saved
as buffers (``shared_hidden_units``, ``expert_hidden_units``, ``representative_units``).

Calibration (``prepare``) runs the dense model on the first training examples of ``calibration_data`` and keeps the
inputs of every converted FFN. The released code carves layer by layer on the outputs of the layers already carved;
we calibrate every layer on the dense model in one pass (``choices.py`` lists this and every other difference).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
from pydantic import Field

from ...adapters.dense_ffn import DenseFFN
from ...config import StrictModel
from ...layers import MoE
from ...layers.routers.base import build_router
from ...recycling import register_method
from ..sparse_upcycling.recycling import dense_module, experts_for, fill_expert, restricted
from .carving import CarvingPlan, hidden_activations, plan_carving
from .router import CMoERouter

PAPER = "https://arxiv.org/abs/2502.04416"
DEFAULT_CALIBRATION = {"image_classification": "fashion_mnist"}  # any other task reads text


class CMoEOptions(StrictModel):
    shared_experts: int = Field(2, ge=0, description="N_s: always-on experts of m units each, one shared FFN")
    activation_top_k: int = Field(10, ge=1, description="K_a: a unit is active on a token when its |activation| is "
                                  "among the token's K_a largest")  # fmt: skip
    statistic: Literal["raw", "cosine"] = Field(
        "raw", description="activations measured as the FFN computes them (raw) or on L2-normalised inputs and rows "
        "(cosine, released code)"
    )  # fmt: skip
    distance: Literal["l1", "l2"] = Field("l1", description="k-means distance between marker vectors and centroids")
    kmeans_iterations: int = Field(10, ge=1, description="balanced k-means steps (stops once stable; released: 1)")
    assignment: Literal["linear", "greedy"] = Field(
        "linear", description="equal-size assignment: exact linear assignment (needs scipy) or greedy"
    )
    router_rows: Literal["raw", "normalized"] = Field(
        "raw", description="router rows: the representative units' W_up / W_gate rows as they are, or L2-normalised "
        "(released code)"
    )  # fmt: skip
    bias_update_rate: float = Field(0.001, ge=0, description="γ: load-balancing bias step per training batch")
    calibration_data: str | None = Field(
        None, description="train split of a built-in set or the user's data (default: shakespeare for text models, "
        "fashion_mnist for image models)"
    )  # fmt: skip
    calibration_examples: int = Field(64, ge=1, description="calibration examples (token blocks or images)")
    calibration_seq_len: int = Field(128, ge=2, description="tokens per calibration block (text models)")
    max_tokens: int | None = Field(8192, ge=1, description="at most this many calibration rows per FFN (evenly "
                                   "spaced); None: all")  # fmt: skip


def prepare(model, adapter, sites, config) -> list[torch.Tensor]:
    """The inputs x [t, d] each converted FFN receives on the calibration examples (train split only)."""
    from ...eval.calibration import calibration_inputs, collect_ffn_inputs

    options = CMoEOptions(**config.options)
    data = options.calibration_data or DEFAULT_CALIBRATION.get(adapter.task, "shakespeare")
    try:
        inputs = calibration_inputs(model, adapter, data, options.calibration_examples, options.calibration_seq_len)
    except (TypeError, ValueError) as error:  # e.g. text for an image model: say which option to change
        raise ValueError(f"cmoe could not calibrate this {adapter.task.replace('_', ' ')} model on {data!r} ({error}); "
                         "set calibration_data to a dataset of the model's own inputs") from None  # fmt: skip
    rows = collect_ffn_inputs(model, adapter, [site.name for site in sites], inputs, max_tokens=options.max_tokens)
    return [rows[site.name] for site in sites]


def carve(dense: DenseFFN, x: torch.Tensor, routed_experts: int, options: CMoEOptions) -> CarvingPlan:
    """The carving plan of ``dense`` from its calibration inputs x [t, d]."""
    h, total = dense.d_hidden, options.shared_experts + routed_experts
    width = h // total
    if width < 1:
        raise ValueError(f"{options.shared_experts} shared + {routed_experts} routed experts leave no hidden unit per "
                         f"expert: the FFN has {h}; use fewer experts")  # fmt: skip
    activations = hidden_activations(dense, x, options.statistic)  # [t, h]
    return plan_carving(activations, h - routed_experts * width, routed_experts, options.activation_top_k,
                        options.kmeans_iterations, options.distance, options.assignment)  # fmt: skip


@register_method("cmoe", PAPER, "training-free carving into shared experts (most often active units) and routed "
                 "experts (balanced k-means on activation markers) under an analytic router; exact with every expert "
                 "active", options=CMoEOptions, prepare=prepare)  # fmt: skip
@torch.no_grad()
def cmoe(dense: DenseFFN, config, generator: torch.Generator, context: torch.Tensor) -> MoE:
    options = CMoEOptions(**config.options)
    if config.router.type not in ("topk", "cmoe"):  # topk: the recipe default, left as is
        raise ValueError(f"cmoe builds its own analytic router (router type cmoe), not {config.router.type!r}; "
                         "leave router.type unset or set it to cmoe")  # fmt: skip
    if dense.hidden_norm is not None:
        raise ValueError("cmoe cannot split an FFN with a LayerNorm over its hidden units")
    plan = carve(dense, context, config.num_experts, options)
    has_shared = plan.shared.numel() > 0
    routed = replace(dense, b_down=None)  # b_down belongs to no unit: the shared expert (or a shared bias) adds it
    shared_bias = not has_shared and dense.b_down is not None  # no shared expert: b_down added once, unweighted
    experts = experts_for(routed, config.num_experts, plan.groups.shape[1], shared_bias=shared_bias)
    for j in range(config.num_experts):
        fill_expert(experts, j, routed, plan.groups[j])
    if experts.shared_bias is not None:
        experts.shared_bias.copy_(dense.b_down)
    shared = dense_module(restricted(dense, plan.shared, b_down=True)) if has_shared else None
    moe = MoE(analytic_router(dense, plan.representatives, config, options), experts, shared)
    # provenance: the dense hidden units each part holds, and the units the router reads
    moe.register_buffer("expert_hidden_units", plan.groups.contiguous())
    moe.register_buffer("representative_units", plan.representatives)
    if has_shared:
        moe.register_buffer("shared_hidden_units", plan.shared)
    return moe


def analytic_router(dense: DenseFFN, representatives: torch.Tensor, config, options: CMoEOptions) -> CMoERouter:
    """The router whose expert j reads unit r_j's W_up / W_gate rows (and biases)."""
    biased = dense.b_up is not None
    router = build_router("cmoe", d_model=dense.d_model, num_experts=config.num_experts, top_k=config.top_k,
                          activation=dense.activation, gated=dense.gated, bias=biased,
                          bias_update_rate=options.bias_update_rate)  # fmt: skip
    pairs = [(router.up, dense.w_up, dense.b_up)]
    if dense.gated:
        pairs.append((router.gate, dense.w_gate, dense.b_gate))
    for linear, weight, bias in pairs:
        rows = weight[representatives].float()  # [e, d]
        if options.router_rows == "normalized":  # released code: unit rows; the scores lose the units' scale
            rows = torch.nn.functional.normalize(rows, dim=-1)
        linear.weight.copy_(rows)
        if biased:
            linear.bias.copy_(torch.zeros(len(representatives)) if bias is None else bias[representatives].float())
    return router
