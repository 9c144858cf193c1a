"""Drop-Upcycling (Nakamura et al., arXiv 2502.19261): copies of the dense FFN with part of every copy redrawn.

Every expert starts as an exact copy of the dense FFN (sparse upcycling). Then, for each expert on its own, a random
set S of ⌊r·h⌋ hidden units (h = FFN hidden width) is re-initialised: rows S of W_gate and W_up [h, d] and columns
S of W_down [d, h] are drawn from N(μ, σ²), with μ, σ the mean and standard deviation of the dense matrix they
replace (one pair per matrix). The kept units carry the dense model's knowledge; the redrawn ones differ between
experts, which is what lets the experts specialise (the paper's point: naive copies stay alike for a long time).

r = 0 is sparse upcycling exactly (same draws, same router); r = 1 redraws every unit, a from-scratch MoE with the
dense matrices' statistics. For 0 < r < 1 the MoE is *not* dense-equivalent at step 0, by design.

Choices the paper leaves open or the released conversion (conversions/drop_upcycling.py) makes differently:
  - ``index_sets``: ``shared`` (the paper: one S per expert for all three matrices) or ``per_matrix`` (the released
    script draws S anew for W_gate, W_up and W_down, so a unit can be new in one matrix and kept in another);
  - ``statistics``: ``matrix`` (the paper: μ, σ of the whole dense matrix) or ``dropped`` (the released script: μ, σ
    of the rows / columns being replaced only);
  - biases (the paper's and released models have none): a redrawn unit's b_up / b_gate entry is drawn from N(μ, σ²)
    of the dense bias vector, so the unit is new as a whole; b_down is per output, not per unit, and stays a copy.
    A LayerNorm over the hidden units (rare) keeps its dense gain and shift.
The released script also permutes each expert's hidden units; a permutation computes the same function, so we
leave the units in place (which lets tests compare kept units with the dense FFN index by index).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from ...adapters.dense_ffn import DenseFFN
from ...config import StrictModel
from ...layers import MoE
from ...recycling import register_method
from ...recycling.routers import build_recipe_router
from ..sparse_upcycling.recycling import experts_for, fill_expert

# weight name -> the axis of the hidden units in it: rows of W_gate / W_up [h, d], columns of W_down [d, h]
UNIT_AXIS = {"w_gate": 0, "w_up": 0, "w_down": 1}
# the per-unit bias that is redrawn with a weight's units
UNIT_BIAS = {"w_gate": "b_gate", "w_up": "b_up"}


class DropUpcyclingOptions(StrictModel):
    drop_ratio: float = Field(0.5, ge=0, le=1, description="r: share of each expert's hidden units re-initialised")
    index_sets: Literal["shared", "per_matrix"] = Field(
        "shared", description="shared: one unit set per expert for W_gate, W_up and W_down (paper); per_matrix: a "
        "set drawn anew for each matrix (released conversion script)",
    )  # fmt: skip
    statistics: Literal["matrix", "dropped"] = Field(
        "matrix", description="mean / std of the new weights from the whole dense matrix (paper) or from the rows / "
        "columns being replaced (released conversion script)",
    )  # fmt: skip


def dropped_count(d_hidden: int, drop_ratio: float) -> int:
    """⌊r·h⌋, with a tolerance so r·h a hair under an integer in floating point (0.7·10) still counts it."""
    return min(d_hidden, math.floor(drop_ratio * d_hidden + 1e-9))


@register_method(
    "drop_upcycling",
    paper="https://arxiv.org/abs/2502.19261",
    description="E copies of the dense FFN, each with its own random share r of hidden units re-initialised from "
    "the dense weights' statistics + a new router",
    options=DropUpcyclingOptions,
)
@torch.no_grad()
def drop_upcycling(dense: DenseFFN, config, generator: torch.Generator) -> MoE:
    options = DropUpcyclingOptions(**config.options)
    experts = experts_for(dense, config.num_experts, dense.d_hidden)
    for i in range(config.num_experts):
        fill_expert(experts, i, dense, slice(None))
    dropped = dropped_count(dense.d_hidden, options.drop_ratio)
    if dropped:  # r = 0 draws nothing here, so the router below is drawn exactly as sparse upcycling draws it
        for i in range(config.num_experts):
            redraw_units(experts, i, dense, dropped, options, generator)
    return MoE(build_recipe_router(config, dense.d_model, config.num_experts, generator), experts)


def redraw_units(experts, i: int, dense: DenseFFN, dropped: int, options: DropUpcyclingOptions,
                 generator: torch.Generator) -> None:  # fmt: skip
    """Expert i: ``dropped`` hidden units of every projection redrawn from the dense matrix's N(μ, σ²)."""
    shared = torch.randperm(dense.d_hidden, generator=generator)[:dropped] if options.index_sets == "shared" else None
    for name, axis in UNIT_AXIS.items():
        source = getattr(dense, name)
        if source is None:  # a plain (ungated) FFN has no W_gate
            continue
        units = shared if shared is not None else torch.randperm(dense.d_hidden, generator=generator)[:dropped]
        reference = source if options.statistics == "matrix" else source.index_select(axis, units)
        shape = (dropped, source.shape[1]) if axis == 0 else (source.shape[0], dropped)
        getattr(experts, name)[i].index_copy_(axis, units, normal_like(reference, shape, generator))
        bias_name = UNIT_BIAS.get(name)
        if bias_name is not None and getattr(experts, bias_name) is not None:
            getattr(experts, bias_name)[i].index_copy_(0, units, normal_like(getattr(dense, bias_name), (dropped,),
                                                                             generator))  # fmt: skip


def normal_like(reference: torch.Tensor, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A draw of ``shape`` from N(mean, std²) of ``reference`` (computed in fp32; a single value has std 0), in its
    dtype."""
    values = reference.float()
    std = values.std() if values.numel() > 1 else values.new_zeros(())
    draw = torch.randn(shape, generator=generator) * std + values.mean()
    return draw.to(reference.dtype)
