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


def naive_mixture_of_attention(module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, t, d] -> [b, t, d] for a :class:`~upcycle.layers.attention.MixtureOfAttention` with plain causal
    masking: each expert and each query head on its own, softmax attention written out, gates applied per token."""
    from .rotary import apply_rope

    b, t, _ = x.shape
    c, groups = module.head_dim, module.num_heads // module.num_kv_heads
    gates = torch.softmax(module.router.gate(x).float(), dim=-1)  # [b, t, e]
    causal = torch.ones(t, t, dtype=torch.bool).tril()

    def heads(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # [f, d] -> [b, heads, t, c]
        y = x @ weight.T + (0 if bias is None else bias)
        return y.view(b, t, -1, c).transpose(1, 2)

    out = torch.zeros_like(x)
    for j in range(module.num_experts):
        kv_j = 0 if module.shared_kv else j
        q = apply_rope(heads(module.w_q[j], None if module.b_q is None else module.b_q[j]), cos, sin)
        k = apply_rope(heads(module.w_k[kv_j], None if module.b_k is None else module.b_k[kv_j]), cos, sin)
        v = heads(module.w_v[kv_j], None if module.b_v is None else module.b_v[kv_j])
        per_head = []
        for head in range(module.num_heads):
            scores = q[:, head] @ k[:, head // groups].transpose(-1, -2) * c**-0.5  # [b, t, t]
            scores = scores.masked_fill(~causal, float("-inf"))
            per_head.append(torch.softmax(scores, dim=-1) @ v[:, head // groups])  # [b, t, c]
        y = torch.cat(per_head, dim=-1) @ module.w_o[j].T  # [b, t, d]
        if module.b_o is not None:
            y = y + module.b_o[j]
        out = out + gates[..., j : j + 1] * y
    return out
