"""The decode fast path of the pair-based backends: with a handful of (token, expert) pairs (one token being
decoded), run each token's experts directly on it, with no sorting over all pairs, grouping or padding.

Decoding one token costs reading the chosen experts' weights; everything else a grouped backend does (sort, count,
offsets, a padded buffer over all experts) is fixed overhead that, at one token, rivals the matmuls themselves.
Here the experts read their weights as views of the stacked tensors (no gathered copy: a copy of the chosen
weights would triple the bytes moved, and bytes are decoding's whole cost on a CPU). A token's experts with
consecutive ids (granular experts of one whole copy, arXiv 2410.07524, or fine-grained experts chosen side by side)
are one slice of the stacked weights and run together (:meth:`Experts.forward_part`): a token routed to a whole copy
then costs the dense FFN's three matmuls, not three per expert. Not registered as a backend of its
own: ``grouped`` and ``grouped_mm`` take this path by themselves below :data:`FEW_PAIRS`.
Dimension letters: t tokens, d model width, c experts of one run.
"""

from __future__ import annotations

from itertools import pairwise

import torch

from ..one_row import one_row_kernels

# At most this many routed pairs (t·k, before the mask) take this path: one decoding token at top-k ≤ 8, where
# every pair is a different expert. Beyond it tokens start sharing experts, and a grouped kernel reads each
# chosen expert's weights once instead of once per pair.
FEW_PAIRS = 8


def few_pairs(experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None):
    with one_row_kernels(x, rows=1):  # every matmul here reads one token's row
        return _few_pairs(experts, x, indices, weights, mask)


def _few_pairs(experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None):
    # the routing read on the host once (free on CPU): at one token the cost is the number of kernel calls below
    chosen = indices.tolist()  # [t][k]
    kept = None if mask is None else mask.tolist()
    outputs = []
    for i, token_experts in enumerate(chosen):
        picks = sorted((e, j) for j, e in enumerate(token_experts) if kept is None or kept[i][j])  # (expert, slot)
        total = None
        for run in runs([e for e, _ in picks]):
            first, slots = picks[run.start][0], [j for _, j in picks[run]]
            # one expert: its own matmuls, measured faster than a batched matmul of one; its w[i] views give full-size
            # zero gradients in the backward, but at most FEW_PAIRS of them
            if len(slots) == 1:
                out = experts.expert_forward(first, x[i : i + 1], experts.expert_weights(first))  # [1, d]
                y = out[0] * weights[i, slots[0]]  # [d] (a 0-d weight keeps out's dtype)
            else:  # [d]: the run's experts weighted and summed by the experts themselves
                y = experts.forward_part(x[i : i + 1], slice(first, first + len(slots)), weights[i, slots, None])[0]
            total = y if total is None else total + y
        outputs.append(x.new_zeros(x.shape[-1]) if total is None else total)
    return outputs[0].unsqueeze(0) if len(outputs) == 1 else torch.stack(outputs)  # [t, d]


def runs(ids: list[int]) -> list[slice]:
    """The longest stretches of consecutive values in sorted ``ids``, as slices of the list."""
    bounds = [0, *(j for j in range(1, len(ids)) if ids[j] != ids[j - 1] + 1), len(ids)]
    return [slice(a, b) for a, b in pairwise(bounds) if b > a]
