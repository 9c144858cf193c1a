"""Naive per-token implementations, used only by tests as ground truth for every backend and router.

Written for obviousness: one token, one vector, one expert at a time, reading the stacked weights directly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .dual_experts import DualPathExperts
from .experts import Experts
from .routing import Routing


def expert_on_vector(experts: Experts, i: int, v: torch.Tensor) -> torch.Tensor:
    """Expert i on one token vector v [d] -> [d]."""
    up = experts.w_up[i] @ v + (experts.b_up[i] if experts.b_up is not None else 0)
    if experts.w_gate is None:
        hidden = experts.act(up)
    else:
        gate = experts.w_gate[i] @ v + (experts.b_gate[i] if experts.b_gate is not None else 0)
        hidden = experts.act(gate) * up
    if experts.norm_weight is not None:
        centered = hidden - hidden.mean()
        hidden = centered / torch.sqrt(centered.pow(2).mean() + experts.hidden_norm_eps)
        hidden = hidden * experts.norm_weight[i] + experts.norm_bias[i]
    return experts.w_down[i] @ hidden + (experts.b_down[i] if experts.b_down is not None else 0)


def naive_sparse_moe(experts: Experts, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """x [t, d] -> [t, d]: for each token, the weighted sum of its executed experts, plus the shared bias."""
    executed = routing.executed()
    rows = []
    for token in range(x.shape[0]):
        acc = torch.zeros_like(x[token]) if experts.shared_bias is None else experts.shared_bias.clone()
        for choice in range(routing.indices.shape[1]):
            if executed[token, choice]:
                i = int(routing.indices[token, choice])
                acc = acc + routing.weights[token, choice] * expert_on_vector(experts, i, x[token])
        rows.append(acc)
    return torch.stack(rows)


def naive_slot_moe(experts: Experts, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """x [b, n, d] -> [b, n, d] for slot routing, one example and one slot at a time."""
    y = _naive_slots(lambda i, v: expert_on_vector(experts, i, v), x, routing)
    return y if experts.shared_bias is None else y + experts.shared_bias


def naive_dual_path_moe(experts: DualPathExperts, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """x [b, n, d] -> [b, n, d] for dual-path experts: expert i < e_c is core expert i, else universal i - e_c."""

    def expert(i: int, v: torch.Tensor) -> torch.Tensor:
        if i < experts.num_core:
            return expert_on_vector(experts.core, i, v)
        return expert_on_vector(experts.universal, i - experts.num_core, v)

    return _naive_slots(expert, x, routing)


def _naive_slots(expert: Callable[[int, torch.Tensor], torch.Tensor], x: torch.Tensor, routing: Routing):
    """Slot j of each example mixes its tokens by ``dispatch[:, :, j]`` and runs through ``expert(j // s, ·)``;
    each token mixes the slot outputs by its ``combine`` row."""
    b, n, _ = x.shape
    s = routing.slots_per_expert
    out = []
    for example in range(b):
        slot_outputs = []
        for slot in range(routing.dispatch.shape[-1]):
            slot_input = (routing.dispatch[example, :, slot].unsqueeze(-1) * x[example]).sum(0)  # [d]
            slot_outputs.append(expert(slot // s, slot_input))
        slot_outputs = torch.stack(slot_outputs)  # [S, d]
        tokens = [(routing.combine[example, token].unsqueeze(-1) * slot_outputs).sum(0) for token in range(n)]
        out.append(torch.stack(tokens))
    return torch.stack(out)
