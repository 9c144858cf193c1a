"""The shared expert of MoE targets that add it unweighted (no sigmoid gate): its checks and its zero stand-in."""

from __future__ import annotations

import torch

from .hf_moe_common import Source, refuse, single_value


def ungated_shared_width(source: Source, target: str, hint: str) -> int:
    """Check every shared expert is a bias-free SiLU-gated MLP added without a gate, as ``target``'s; their common
    width (0: no layer has one). ``hint``: what to change when one has a gate."""
    widths = {}
    for i, moe in sorted(source.moe.items()):
        shared = moe.shared_expert
        if shared is None:
            continue
        if shared.gate is None or shared.activation != "silu" or shared.up.bias is not None:
            gated = "gated" if shared.gate is not None else "plain"
            kind = f"{gated} {shared.activation}, bias={shared.up.bias is not None}"
            raise refuse(
                target, f"layer {i}: the shared expert ({kind}) is not a bias-free SiLU-gated MLP like {target}'s"
            )
        if moe.shared_expert_gate is not None:
            raise refuse(
                target,
                f"layer {i}: the shared expert is scaled by a sigmoid gate, but {target} adds its shared MLP "
                f"unweighted ({hint})",
            )
        widths[i] = shared.up.out_features
    return single_value(target, "shared expert width", widths) if widths else 0


def zero_shared(width: int, d: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A shared MLP that adds ``down(silu(0) ⊙ 0) = 0`` exactly, for layers without one in a model with some."""
    return {
        "gate": torch.zeros(width, d, dtype=dtype),  # [s, d]
        "up": torch.zeros(width, d, dtype=dtype),  # [s, d]
        "down": torch.zeros(d, width, dtype=dtype),  # [d, s]
    }
