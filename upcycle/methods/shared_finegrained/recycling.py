"""Shared + fine-grained experts carved out of one dense FFN, the layout of DeepSeekMoE (Dai et al., arXiv
2401.06066: fine-grained expert segmentation and shared-expert isolation) as Qwen1.5-MoE upcycled it from a dense
model (Qwen team, 2024; Qwen2 Technical Report, arXiv 2407.10671: FFN partitions replicated into fine-grained
experts beside always-on shared experts).

The h hidden units of the dense FFN are split in two:

    shared   s units, one dense FFN every token passes through (the shared expert);
    routed   the other h − s units, cut into S contiguous *segments* of w = (h − s) / S units each, and
             replicated R times: E = R·S fine-grained experts, expert ``c·S + g`` = segment g of copy c.

Which units are shared (``shared_units``): ``weight_norm`` keeps the units with the largest
‖W_gate[i]‖·‖W_up[i]‖·‖W_down[:, i]‖, a data-free proxy of how much a unit can contribute (MoEBERT, arXiv
2204.07675, keeps the most important units in every expert for the same reason); ``first`` takes the first s, the
plain partition. ``shared_fraction`` sets s ≈ f·h; s takes whatever remainder makes h − s divisible by S.

Routing is granular upcycling's (``sparse_upcycling``'s ``granularity``; He et al., arXiv 2410.07524): router rows
tied inside each copy, so with top-k a multiple of S and renormalised weights a token picks whole copies, each
segment weighted 1/k, and W_down of the routed experts is scaled by S to undo it. Then

    MoE(x) = shared(x) + Σ_{picked copies} Σ_g (1/k)·S·segment_g(x) = shared(x) + routed(x) = FFN(x)

exactly at conversion (``upcycle.verify`` checks it); other top-k values or noise trade that for diversity.
b_down belongs to no unit: the shared expert carries it (the routed experts when s = 0).

``shared_gate``: ``none`` adds the shared expert unweighted (DeepSeekMoE / DeepSeek-V3, GraniteMoeShared, GLM4-MoE);
``sigmoid`` scales it by sigmoid(w·x) as Qwen1.5-MoE / Qwen2-MoE do, with w = 0 and the shared W_down doubled, so
sigmoid(0) = ½ keeps the layer exact and the gate learns from there.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ...adapters.dense_ffn import DenseFFN
from ...config import StrictModel
from ...layers import MoE
from ...recycling import register_method
from ..sparse_upcycling.recycling import dense_module, granular_experts, restricted, virtual_group_router


class SharedFineGrainedOptions(StrictModel):
    shared_fraction: float = Field(0.25, ge=0, lt=1, description="share f of the hidden units in the shared expert")
    segments: int = Field(4, ge=1, description="S: fine-grained experts per copy of the routed units")
    shared_units: Literal["weight_norm", "first"] = Field(
        "weight_norm", description="which units are shared: the largest weight-norm products, or the first s"
    )
    shared_gate: Literal["none", "sigmoid"] = Field(
        "none", description="none: shared expert added as is (DeepSeek-V3, GraniteMoeShared); sigmoid: scaled by "
        "sigmoid(w·x), w = 0 at conversion (Qwen2-MoE)",
    )  # fmt: skip
    noise_std: float = Field(0.0, ge=0, description="noise on each routed copy, relative to each weight's std")
    weight_scaling: Literal["auto", "none"] = Field("auto", description="undo the top-k weights (sparse_upcycling)")


def split_units(dense: DenseFFN, options: SharedFineGrainedOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(shared units [s], routed units [h − s]), both ascending; h − s a multiple of ``segments``."""
    h, segments = dense.d_hidden, options.segments
    segment_width = (h - round(options.shared_fraction * h)) // segments
    if segment_width < 1:
        raise ValueError(
            f"segments={segments} leaves no routed unit per expert: the FFN has {h} hidden units and shared_fraction "
            f"{options.shared_fraction} shares {round(options.shared_fraction * h)}; lower segments or shared_fraction"
        )
    shared_count = h - segments * segment_width
    if options.shared_units == "first":
        order = torch.arange(h)
    else:  # largest weight-norm product first; a stable sort keeps ties in index order
        score = dense.w_up.float().norm(dim=1) * dense.w_down.float().norm(dim=0)  # [h]
        if dense.w_gate is not None:
            score = score * dense.w_gate.float().norm(dim=1)
        order = torch.sort(score, descending=True, stable=True).indices
    shared = order[:shared_count].sort().values
    routed = order[shared_count:].sort().values
    return shared, routed


@register_method(
    "shared_finegrained",
    paper="https://arxiv.org/abs/2401.06066",
    description="an always-on shared expert + fine-grained routed experts carved from the dense FFN "
    "(DeepSeekMoE layout, upcycled as Qwen1.5-MoE); exact at conversion",
    options=SharedFineGrainedOptions,
)
@torch.no_grad()
def shared_finegrained(dense: DenseFFN, config, generator: torch.Generator) -> MoE:
    options = SharedFineGrainedOptions(**config.options)
    if dense.hidden_norm is not None:
        raise ValueError("shared_finegrained cannot split an FFN with a LayerNorm over its hidden units")
    segments = options.segments
    if config.num_experts % segments:
        raise ValueError(
            f"num_experts={config.num_experts} is not a multiple of segments={segments}: the routed experts are "
            f"whole copies of the {segments} segments; choose a multiple of {segments} experts or other segments"
        )
    copies = config.num_experts // segments
    shared_units, routed_units = split_units(dense, options)
    has_shared = shared_units.numel() > 0
    routed = restricted(dense, routed_units, b_down=not has_shared)
    experts = granular_experts(routed, copies, segments, options.noise_std, options.weight_scaling, config, generator)
    router = virtual_group_router(config, dense.d_model, copies, segments, generator)
    gated = has_shared and options.shared_gate == "sigmoid"
    shared = dense_module(restricted(dense, shared_units, b_down=True), 2.0 if gated else 1.0) if has_shared else None
    moe = MoE(router, experts, shared, shared_expert_gate=gated)
    if gated:
        torch.nn.init.zeros_(moe.shared_expert_gate.weight)  # sigmoid(0) = ½, undone by the doubled W_down
    # provenance: the dense hidden units each part holds
    expert_units = routed_units.view(segments, -1).repeat(copies, 1)  # [E, w]: expert c·S + g = segment g
    moe.register_buffer("expert_hidden_units", expert_units.contiguous())
    if has_shared:
        moe.register_buffer("shared_hidden_units", shared_units)
    return moe
