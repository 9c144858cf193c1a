"""Sorted backend: sort the executed (token, expert) pairs by expert, gather their tokens once, run each expert on
its contiguous slice, weight the rows and scatter-add them back (D2DMoE's efficient execution, arXiv 2310.04361,
§3.5; the layout of MegaBlocks / ScatterMoE without their kernels).

Unlike ``grouped`` there is no padded ``[e, c, d]`` buffer: with unbalanced loads (dynamic-k sends most tokens to
a few experts) ``grouped`` multiplies ``e·c`` rows, this backend exactly the executed pairs, at the price of one
matmul per non-empty expert (a loop over experts, never over tokens). Splitting the slices costs one host sync
(the group sizes), free on CPU. ``index_select`` / ``index_add`` keep the backward a gather/scatter pair. It is also
the fallback of ``grouped_mm`` wherever that kernel cannot run.
Registered as ``"sorted"``; the file is not called ``sorted.py`` because importing it would shadow the builtin
``sorted`` inside this package. Dimension letters: t tokens, d model width, k choices per token, p executed pairs.
"""

from __future__ import annotations

import torch

from .pairs import executed_pairs, scatter_to_tokens, sort_by_expert
from .registry import register_backend


@register_backend("sorted")
def sorted_pairs(experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None):
    pairs, counts = sort_by_expert(executed_pairs(indices, weights, mask), experts.num_experts)
    if pairs.expert.numel() == 0:
        return x.new_zeros(x.shape)
    counts = counts.tolist()  # the one host sync
    rows = x.index_select(0, pairs.token)  # [p, d], gathered once
    per_expert = experts.unbind_experts()  # views taken once: indexing w[i] in the loop costs e full-size gradients
    outputs = [
        experts.expert_forward(i, slice_, per_expert[i])
        for i, slice_ in enumerate(rows.split(counts))
        if counts[i]  # an expert nobody chose costs nothing
    ]
    return scatter_to_tokens(torch.cat(outputs), pairs, x.shape[0])  # [t, d]; outputs still sorted by expert
