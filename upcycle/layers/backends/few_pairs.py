"""The decode fast path of the pair-based backends: with a handful of (token, expert) pairs (one token being
decoded), run each pair's expert directly on its token, with no sorting, grouping or padding.

Decoding one token costs reading the chosen experts' weights; everything else a grouped backend does (sort, count,
offsets, a padded buffer over all experts) is fixed overhead that, at one token, rivals the matmuls themselves.
Here each pair reads its expert's weights as views of the stacked tensors (no gathered copy: a copy of the chosen
weights would triple the bytes moved, and bytes are decoding's whole cost on a CPU). Not registered as a backend of
its own: ``grouped`` and ``grouped_mm`` take this path by themselves below :data:`FEW_PAIRS`.
"""

from __future__ import annotations

import torch

from .pairs import executed_pairs, scatter_to_tokens

# At most this many routed pairs (t·k, before the mask) take the per-pair path: one decoding token at top-k ≤ 8,
# where every pair is a different expert. Beyond it tokens start sharing experts, and a grouped kernel reads each
# chosen expert's weights once instead of once per pair.
FEW_PAIRS = 8


def few_pairs(experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None):
    pairs = executed_pairs(indices, weights, mask)
    if pairs.expert.numel() == 0:
        return x.new_zeros(x.shape)
    rows = x.index_select(0, pairs.token)  # [p, d]
    # indexing w[i] per pair: at p ≤ FEW_PAIRS its backward's full-size zero gradients stay bounded, and an
    # unbind of every expert would cost more than the pairs themselves
    outputs = [
        experts.expert_forward(i, rows[j : j + 1], experts.expert_weights(i))
        for j, i in enumerate(pairs.expert.tolist())  # the one host sync, free on CPU
    ]
    return scatter_to_tokens(torch.cat(outputs), pairs, x.shape[0])  # [t, d]
