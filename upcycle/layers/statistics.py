"""Routing statistics from a :class:`Routing` record: per-expert load, routing entropy, dead experts, drops.

Sparse routing: ``load[i]`` = share of executed (token, expert) pairs that went to expert i; ``entropy`` = mean
over tokens of the router distribution's entropy (nats); ``dropped_pairs`` = share of chosen pairs not executed
(capacity or dynamic-k threshold); ``dropped_tokens`` = share of tokens with no executed expert.
Slot routing: ``load[i]`` = share of the total combine weight that reads expert i's slots; entropy of each token's
combine distribution over slots; nothing is dropped.
``dead_experts`` = experts with load below 1% of a uniform share (exactly zero for sparse routing).
"""

from __future__ import annotations

import math

import torch

from .routing import Routing


def _entropy(probs: torch.Tensor) -> float:  # probs [..., m] -> mean entropy
    p = probs.float()
    return float(-(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean())


@torch.no_grad()
def routing_statistics(routing: Routing) -> dict:
    e = routing.num_experts
    if routing.is_sparse:
        executed = routing.executed()
        counts = torch.bincount(routing.indices[executed], minlength=e).float()
        load = counts / counts.sum().clamp_min(1)
        entropy = _entropy(routing.router_probs) if routing.router_probs is not None else float("nan")
        dead = int((counts == 0).sum())
        dropped_pairs = float(1 - executed.float().mean())
        dropped_tokens = float((~executed.any(-1)).float().mean())
        tokens = routing.indices.shape[0]
    else:
        mass = routing.combine.float().sum((0, 1)).view(e, routing.slots_per_expert).sum(-1)  # [e]
        load = mass / mass.sum().clamp_min(1e-30)
        entropy = _entropy(routing.combine)
        dead = int((load < 0.01 / e).sum())
        dropped_pairs = dropped_tokens = 0.0
        tokens = routing.combine.shape[0] * routing.combine.shape[1]
    return {
        "load": load.cpu().tolist(),
        "entropy": entropy,
        "max_entropy": math.log(e) if routing.is_sparse else math.log(e * routing.slots_per_expert),
        "dead_experts": dead,
        "dropped_pairs": dropped_pairs,
        "dropped_tokens": dropped_tokens,
        "tokens": tokens,
    }
