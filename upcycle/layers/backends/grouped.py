"""Grouped backend: sort (token, expert) pairs by expert, gather the tokens into a padded ``[e, c, d]`` buffer, run
every expert at once with batched matmuls, weight the rows and scatter-add them back to their tokens.
No Python loop over tokens or experts.

The buffer holds ``c`` = the largest group's size rows per expert. Padding rows read token 0 and carry weight 0, so
they add exactly zero to the output and to every gradient. Gathers use ``index_select`` (its backward is an
``index_add``, several times faster on CPU than the accumulate-``index_put`` behind advanced indexing). Reading
``c`` costs one host sync, free on CPU; a GPU kernel without padding or sync can register as another backend.
At most ``FEW_PAIRS`` routed pairs (decoding) take the per-pair path of ``few_pairs`` instead.
"""

from __future__ import annotations

import torch

from .few_pairs import FEW_PAIRS, few_pairs
from .registry import register_backend


@register_backend("grouped")
def grouped(experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None):
    if indices.numel() <= FEW_PAIRS:  # decoding: one token's experts, no padded buffer over all of them
        return few_pairs(experts, x, indices, weights, mask)
    t, d = x.shape
    e, k = experts.num_experts, indices.shape[-1]
    expert_of_pair = indices.reshape(-1)  # [t*k]
    token_of_pair = torch.arange(t, device=x.device).repeat_interleave(k)  # [t*k]
    weight_of_pair = weights.reshape(-1)
    if mask is not None:
        keep = mask.reshape(-1)
        expert_of_pair, token_of_pair, weight_of_pair = expert_of_pair[keep], token_of_pair[keep], weight_of_pair[keep]

    order = torch.argsort(expert_of_pair, stable=True)
    expert_sorted = expert_of_pair[order]
    counts = torch.bincount(expert_sorted, minlength=e)  # [e]
    group_start = torch.cumsum(counts, 0) - counts
    position = torch.arange(expert_sorted.numel(), device=x.device) - group_start[expert_sorted]
    capacity = max(int(counts.max()), 1) if expert_sorted.numel() else 1
    row = expert_sorted * capacity + position  # row of each pair in the padded buffer [e*c]

    source_token = torch.zeros(e * capacity, dtype=torch.long, device=x.device)  # padding rows read token 0
    source_token[row] = token_of_pair[order]
    row_weight = weight_of_pair.new_zeros(e * capacity).index_put((row,), weight_of_pair[order])  # padding: 0

    buffer = x.index_select(0, source_token).view(e, capacity, d)  # [e, c, d]
    out = experts.forward_stacked(buffer).reshape(e * capacity, d)  # [e*c, d]
    weighted = out * row_weight.unsqueeze(-1).to(out.dtype)
    return out.new_zeros(t, d).index_add(0, source_token, weighted)  # [t, d]
