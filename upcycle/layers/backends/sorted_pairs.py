"""Sorted backend: sort the executed (token, expert) pairs by expert, gather their tokens once, run each expert on
its contiguous slice, weight the rows and scatter-add them back (D2DMoE's efficient execution, arXiv 2310.04361,
§3.5; the layout of MegaBlocks / ScatterMoE without their kernels).

Unlike ``grouped`` there is no padded ``[e, c, d]`` buffer: with unbalanced loads (dynamic-k sends most tokens to
a few experts) ``grouped`` multiplies ``e·c`` rows, this backend exactly the executed pairs, at the price of one
matmul per non-empty expert (a loop over experts, never over tokens). Splitting the slices costs one host sync
(the group sizes), free on CPU. ``index_select`` / ``index_add`` keep the backward a gather/scatter pair.
Registered as ``"sorted"``; the file is not called ``sorted.py`` because importing it would shadow the builtin
``sorted`` inside this package. Dimension letters: t tokens, d model width, k choices per token, p executed pairs.
"""

from __future__ import annotations

import torch

from .registry import register_backend


@register_backend("sorted")
def sorted_pairs(experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None):
    t, d = x.shape
    k = indices.shape[-1]
    expert_of_pair = indices.reshape(-1)  # [t*k]
    token_of_pair = torch.arange(t, device=x.device).repeat_interleave(k)  # [t*k]
    weight_of_pair = weights.reshape(-1)
    if mask is not None:
        keep = torch.nonzero(mask.reshape(-1)).squeeze(1)  # [p]
        expert_of_pair, token_of_pair = expert_of_pair[keep], token_of_pair[keep]
        weight_of_pair = weight_of_pair.index_select(0, keep)
    if expert_of_pair.numel() == 0:
        return x.new_zeros(t, d)

    order = torch.argsort(expert_of_pair, stable=True)  # [p]; each expert's pairs become one contiguous slice
    token_sorted = token_of_pair[order]
    weight_sorted = weight_of_pair.index_select(0, order)
    counts = torch.bincount(expert_of_pair, minlength=experts.num_experts).tolist()  # the one host sync
    rows = x.index_select(0, token_sorted)  # [p, d], gathered once
    outputs = [
        experts.expert_forward(i, slice_)
        for i, slice_ in enumerate(rows.split(counts))
        if counts[i]  # an expert nobody chose costs nothing
    ]
    out = torch.cat(outputs)  # [p, d], still sorted by expert
    weighted = out * weight_sorted.unsqueeze(-1).to(out.dtype)
    return out.new_zeros(t, d).index_add(0, token_sorted, weighted)  # [t, d]
