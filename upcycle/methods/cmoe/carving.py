"""CMoE's carving plan (Pei et al., arXiv 2502.04416, §3): which dense hidden units go to the shared expert, which to
each routed expert, and which unit represents each routed expert in the router.

    activations   h_i(x) = act(W_gate[i]·x + b_gate[i]) · (W_up[i]·x + b_up[i]) (plain FFNs: act(W_up[i]·x + b_up[i]))
                  on every calibration token; ``statistic=cosine`` (released code) takes x and the rows L2-normalised
    markers       a[t, i] = 1 where unit i is among token t's K_a largest |h_i| (the paper's ATopK)
    rates         μ_i = mean over tokens of a[:, i]
    shared        the units with the highest rates (stable: ties in index order)
    routed        the others, clustered into N_r groups of exactly m units by balanced k-means on their marker
                  columns a[:, i] (a unit is a point in token space): centroids start at the N_r highest-rate routed
                  units, each step assigns units to centroids under the equal-size constraint (a linear assignment
                  over m copies of every centroid), then moves each centroid to its group's mean
    representative  per group, the unit closest to its centroid

Dimension letters: t calibration tokens, d model width, h hidden units, n routed units, k routed experts (N_r), m
units per expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..._optional import require
from ...adapters.dense_ffn import DenseFFN
from ...layers.activations import get_activation


@dataclass
class CarvingPlan:
    shared: torch.Tensor  # [s] shared units, ascending
    groups: torch.Tensor  # [k, m] each routed expert's units, ascending within a group
    representatives: torch.Tensor  # [k] the unit of each group closest to its centroid
    rates: torch.Tensor  # [h] activation rates μ


def hidden_activations(dense: DenseFFN, x: torch.Tensor, statistic: str = "raw") -> torch.Tensor:
    """h [t, h]: each hidden unit's output (what W_down reads) on the tokens x [t, d], in fp32. ``cosine``: x and the
    W_up / W_gate rows L2-normalised first, biases dropped (the released code's statistic, for Llama FFNs)."""
    x = x.float()
    w_up, w_gate = dense.w_up.float(), None if dense.w_gate is None else dense.w_gate.float()
    b_up, b_gate = (None if b is None else b.float() for b in (dense.b_up, dense.b_gate))
    if statistic == "cosine":
        x, w_up = F.normalize(x, dim=-1), F.normalize(w_up, dim=-1)
        w_gate = None if w_gate is None else F.normalize(w_gate, dim=-1)
        b_up = b_gate = None
    act = get_activation(dense.activation)
    up = F.linear(x, w_up, b_up)  # [t, h]
    return act(up) if w_gate is None else act(F.linear(x, w_gate, b_gate)) * up


def activation_markers(activations: torch.Tensor, k_active: int) -> torch.Tensor:
    """a [t, h] bool: unit i is marked active on token t when |h_i| is among the token's ``k_active`` largest."""
    top = activations.abs().topk(k_active, dim=-1).indices  # [t, K_a]
    return torch.zeros_like(activations, dtype=torch.bool).scatter_(1, top, True)


def plan_carving(activations: torch.Tensor, shared_count: int, experts: int, k_active: int, iterations: int,
                 distance: str = "l1", assignment: str = "linear") -> CarvingPlan:  # fmt: skip
    """The shared units and ``experts`` equal routed groups of the h units whose activations [t, h] are given;
    ``shared_count`` + experts · m must equal h."""
    h = activations.shape[1]
    if not 1 <= k_active <= h:
        raise ValueError(f"activation_top_k (K_a) must be between 1 and the {h} hidden units, got {k_active}")
    markers = activation_markers(activations, k_active)
    rates = markers.float().mean(0)  # μ [h]
    order = torch.sort(rates, descending=True, stable=True).indices
    shared, routed = order[:shared_count].sort().values, order[shared_count:]  # routed: by rate, highest first
    points = markers[:, routed].T.float()  # [n, t]: each routed unit's marker column
    groups, centres = balanced_kmeans(points, experts, iterations, distance, assignment)  # [k, m] into routed
    representatives = routed[centres]
    groups = routed[groups].sort(dim=1).values
    return CarvingPlan(shared, groups, representatives, rates)


def balanced_kmeans(points: torch.Tensor, clusters: int, iterations: int, distance: str = "l1",
                    assignment: str = "linear") -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Balanced k-means of the n points [n, t] (n a multiple of ``clusters``; the first ``clusters`` points seed the
    centroids). Returns the groups [k, m] (point indices) and each group's point nearest its centroid [k]."""
    n = points.shape[0]
    size = n // clusters
    centroids = points[:clusters].clone()  # [k, t]
    groups = None
    for _ in range(iterations):
        cost = torch.cdist(points, centroids, p=1.0 if distance == "l1" else 2.0)  # [n, k]
        labels = _assign(cost, size, assignment)  # [n]
        if groups is not None and torch.equal(labels, groups):
            break  # converged: the centroids already are these groups' means
        groups = labels
        centroids = torch.zeros_like(centroids).index_add_(0, labels, points) / size
    members = torch.stack([torch.nonzero(groups == c).squeeze(1) for c in range(clusters)])  # [k, m]
    p = 1.0 if distance == "l1" else 2.0
    nearest = torch.stack([
        members[c, torch.cdist(centroids[c : c + 1], points[members[c]], p=p).argmin()] for c in range(clusters)
    ])  # fmt: skip
    return members, nearest


def _assign(cost: torch.Tensor, size: int, method: str) -> torch.Tensor:
    """labels [n]: each point's cluster, every cluster taking exactly ``size`` points, at the least total cost
    (``linear``: the exact linear assignment over ``size`` copies of every cluster, as the paper solves it with
    Jonker-Volgenant) or greedily (``greedy``: cheapest (point, cluster) pairs first while the cluster has room)."""
    n, k = cost.shape
    if method == "linear":
        optimize = require("scipy.optimize", extra="cmoe", purpose="cmoe's exact assignment (or assignment: greedy)")
        expanded = cost.double().repeat_interleave(size, dim=1).numpy()  # [n, k·size]: column c·size + j = cluster c
        rows, columns = optimize.linear_sum_assignment(expanded)
        labels = torch.empty(n, dtype=torch.long)
        labels[torch.from_numpy(rows)] = torch.from_numpy(columns // size)
        return labels
    labels = torch.full((n,), -1, dtype=torch.long)
    room = torch.full((k,), size, dtype=torch.long)
    for flat in torch.sort(cost.flatten(), stable=True).indices.tolist():
        point, cluster = divmod(flat, k)
        if labels[point] < 0 and room[cluster] > 0:
            labels[point], room[cluster] = cluster, room[cluster] - 1
    return labels
