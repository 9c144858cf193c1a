"""The executed (token, expert) pairs of a sparse routing, flattened and optionally sorted by expert: the prelude
the pair-based backends share. Dimension letters: t tokens, k choices per token, e experts, p executed pairs."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Pairs(NamedTuple):
    token: torch.Tensor  # [p] the token each pair reads and writes
    expert: torch.Tensor  # [p] the expert it runs
    weight: torch.Tensor  # [p] its routing weight


def executed_pairs(indices: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None) -> Pairs:
    """Every (token, expert) pair of ``indices [t, k]`` that ``mask`` keeps, in token order."""
    t, k = indices.shape
    pairs = Pairs(torch.arange(t, device=indices.device).repeat_interleave(k), indices.reshape(-1), weights.reshape(-1))
    if mask is None:
        return pairs
    keep = torch.nonzero(mask.reshape(-1)).squeeze(1)  # [p]
    # index_select rather than boolean indexing: its backward (to the routing weights) is a cheap index_add
    return Pairs(pairs.token[keep], pairs.expert[keep], pairs.weight.index_select(0, keep))


def sort_by_expert(pairs: Pairs, num_experts: int) -> tuple[Pairs, torch.Tensor]:
    """The pairs sorted by expert (each expert's pairs one contiguous slice, stable within it) and the number of
    pairs per expert ``[e]``."""
    order = torch.argsort(pairs.expert, stable=True)  # [p]
    counts = torch.bincount(pairs.expert, minlength=num_experts)  # [e]
    return Pairs(pairs.token[order], pairs.expert[order], pairs.weight.index_select(0, order)), counts


def unit_weights(weight: torch.Tensor) -> bool:
    """Whether every routing weight ``[p]`` is exactly 1 and takes no gradient, so that weighting the outputs can be
    skipped: D2DMoE and MoEfication sum their experts unweighted, and the product is a pass over all ``[p, d]``
    outputs (13% of a MiniLM D2DMoE layer). Checked on CPU only, where reading the answer on the host is free."""
    return weight.device.type == "cpu" and not weight.requires_grad and bool(torch.all(weight == 1))


def scatter_to_tokens(out: torch.Tensor, pairs: Pairs, t: int) -> torch.Tensor:
    """Each pair's output ``[p, d]`` times its routing weight, summed into its token: ``-> [t, d]``."""
    weighted = out if unit_weights(pairs.weight) else out * pairs.weight.unsqueeze(-1).to(out.dtype)
    return out.new_zeros(t, out.shape[-1]).index_add(0, pairs.token, weighted)
