"""Sorted backend: sort the executed (token, expert) pairs by expert, run each expert on the rows of its tokens,
weight them and add them into their tokens (D2DMoE's efficient execution, arXiv 2310.04361, §3.5; the layout of
MegaBlocks / ScatterMoE without their kernels).

Unlike ``grouped`` there is no padded ``[e, c, d]`` buffer: with unbalanced loads (dynamic-k sends most tokens to
a few experts) ``grouped`` multiplies ``e·c`` rows, this backend exactly the executed pairs, at the price of one
matmul per non-empty expert (a loop over experts, never over tokens). Splitting the slices costs one host sync
(the group sizes), free on CPU. Each expert's output goes straight into its tokens (``index_add_``), so no
``[p, d]`` copy of all outputs is ever joined. It is also the fallback of ``grouped_mm`` wherever that kernel
cannot run. Registered as ``"sorted"``; the file is not called ``sorted.py`` because importing it would shadow the
builtin ``sorted`` inside this package. Dimension letters: t tokens, d model width, m one expert's rows,
p executed pairs.
"""

from __future__ import annotations

import torch

from .pairs import executed_pairs, sort_by_expert, unit_weights
from .registry import register_backend


@register_backend("sorted")
def sorted_pairs(experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None):
    pairs, counts = sort_by_expert(executed_pairs(indices, weights, mask), experts.num_experts)
    if pairs.expert.numel() == 0:
        return x.new_zeros(x.shape)
    counts = counts.tolist()  # the one host sync
    # With autograd, the rows are gathered once: one index_select's backward is one index_add, where a gather per
    # expert would each scatter into its own full-size zero gradient. Without, each expert gathers its rows just
    # before its matmul, while they are still in cache (a MiniLM D2DMoE layer: 1.4x faster than one gather).
    rows = x.index_select(0, pairs.token).split(counts) if torch.is_grad_enabled() else None  # [p, d] in slices
    weighted = not unit_weights(pairs.weight)
    per_expert = experts.unbind_experts()  # views taken once: indexing w[i] in the loop costs e full-size gradients
    out = None
    for i, (tokens, weight) in enumerate(zip(pairs.token.split(counts), pairs.weight.split(counts), strict=True)):
        if not counts[i]:  # an expert nobody chose costs nothing
            continue
        y = experts.expert_forward(i, x.index_select(0, tokens) if rows is None else rows[i], per_expert[i])  # [m, d]
        if weighted:
            y = y * weight.unsqueeze(-1).to(y.dtype)
        out = y.new_zeros(x.shape[0], y.shape[-1]) if out is None else out
        out.index_add_(0, tokens, y)
    return out  # [t, d]
