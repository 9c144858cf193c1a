"""Neuron split: partition an FFN's hidden units into E equal experts (MoEfication, arXiv 2110.01786; D2DMoE,
arXiv 2310.04361, §3.2).

Expert i takes its units' rows of W_up (and W_gate, b_up) and columns of W_down. W_down's bias is not split: it
becomes one shared bias added once per token, so with every expert active and unit weights the layer equals the
dense FFN exactly. Partitions:
  - ``kmeans``: balanced k-means on the L2-normalised rows of W_up (gated FFNs: rows of the gate projection), so
    units that respond to similar inputs share an expert (D2DMoE; MoEfication's parameter clustering);
  - ``random``: a random balanced partition (the ablation baseline).
The router attached here gives every selected expert weight 1; D2DMoE / MoEfication then train their own routers.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ...adapters.dense_ffn import DenseFFN
from ...config import StrictModel
from ...layers import Experts, MoE, Router
from ...recycling import register_method
from ...recycling.routers import build_recipe_router
from ..sparse_upcycling.recycling import experts_for, fill_expert


class NeuronSplitOptions(StrictModel):
    partition: Literal["kmeans", "random"] = Field("kmeans", description="how hidden units are grouped")
    kmeans_iterations: int = Field(25, ge=1, description="balanced k-means iterations")


def balanced_kmeans(points: torch.Tensor, clusters: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """Partition ``points [h, d]`` into ``clusters`` groups of exactly h/clusters points -> ``[clusters, h/clusters]``.

    Spherical k-means (cosine similarity to L2-normalised centroids) with a balanced assignment step: in rounds,
    every unassigned point proposes to its most similar cluster that still has room, and each cluster accepts its
    most similar proposers up to its remaining room. Seeded k-means++ style (each next centroid drawn with
    probability proportional to its squared cosine distance from the nearest chosen one): with uniformly drawn
    seeds, two centroids often start in one true group and the balanced assignment cannot separate them again.
    """
    h = points.shape[0]
    size = h // clusters
    points = F.normalize(points.float(), dim=-1)
    centroids = _spread_seeds(points, clusters, generator)
    assignment = torch.full((h,), -1, dtype=torch.long)
    for _ in range(iterations):
        new_assignment = _balanced_assign(points @ centroids.T, size)
        if torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        centroids = F.normalize(sums, dim=-1)
    return torch.stack([torch.nonzero(assignment == c).squeeze(1) for c in range(clusters)])


def _spread_seeds(points: torch.Tensor, clusters: int, generator: torch.Generator) -> torch.Tensor:
    """``clusters`` of the unit-norm ``points [h, d]`` as initial centroids, k-means++ on the cosine distance."""
    chosen = [int(torch.randint(points.shape[0], (1,), generator=generator))]
    distance = (1 - points @ points[chosen[0]]).clamp_min(0)  # [h] to the nearest chosen centroid
    for _ in range(clusters - 1):
        weights = distance.square()
        if weights.sum() <= 0:  # every point coincides with a chosen one: take any point not chosen yet
            weights = torch.ones_like(distance).index_fill_(0, torch.tensor(chosen), 0)
        chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
        distance = torch.minimum(distance, (1 - points @ points[chosen[-1]]).clamp_min(0))
    return points[chosen].clone()


def _balanced_assign(similarity: torch.Tensor, size: int) -> torch.Tensor:
    """similarity [h, c] -> cluster of each point, every cluster receiving exactly ``size`` points."""
    h, c = similarity.shape
    assignment = torch.full((h,), -1, dtype=torch.long)
    room = torch.full((c,), size, dtype=torch.long)
    while (assignment < 0).any():
        open_points = torch.nonzero(assignment < 0).squeeze(1)
        masked = similarity[open_points].masked_fill(room.unsqueeze(0) == 0, float("-inf"))
        best_similarity, choice = masked.max(dim=1)
        for cluster in torch.unique(choice).tolist():  # loop over clusters, not points
            proposers = torch.nonzero(choice == cluster).squeeze(1)
            accepted = proposers[best_similarity[proposers].argsort(descending=True)[: int(room[cluster])]]
            assignment[open_points[accepted]] = cluster
            room[cluster] -= accepted.numel()
    return assignment


def partition_hidden_units(dense: DenseFFN, num_experts: int, partition: str, iterations: int,
                           generator: torch.Generator) -> torch.Tensor:  # fmt: skip
    """``[e, h/e]`` hidden-unit indices of each expert, each row sorted."""
    if dense.d_hidden % num_experts:
        raise ValueError(
            f"{num_experts} experts do not divide the FFN hidden size {dense.d_hidden}; choose a divisor of it "
            f"(e.g. {', '.join(str(n) for n in _divisors(dense.d_hidden))})"
        )
    if partition == "random":
        groups = torch.randperm(dense.d_hidden, generator=generator).view(num_experts, -1)
    else:
        rows = dense.w_gate if dense.gated else dense.w_up
        groups = balanced_kmeans(rows, num_experts, iterations, generator)
    return groups.sort(dim=1).values


def _divisors(n: int, limit: int = 6) -> list[int]:
    return [d for d in range(2, n + 1) if n % d == 0][:limit]


def split_experts(dense: DenseFFN, num_experts: int, options: NeuronSplitOptions,
                  generator: torch.Generator) -> tuple[Experts, torch.Tensor]:  # fmt: skip
    """The dense FFN's hidden units partitioned into ``num_experts`` experts, W_down's bias as the shared bias.
    Returns the experts and the ``[e, h/e]`` dense units each holds (the layer's ``hidden_units`` provenance)."""
    if dense.hidden_norm is not None:
        raise ValueError("neuron split cannot divide an FFN with a LayerNorm over its hidden units")
    groups = partition_hidden_units(dense, num_experts, options.partition, options.kmeans_iterations, generator)
    experts = experts_for(dense, num_experts, groups.shape[1], shared_bias=dense.b_down is not None)
    for i, units in enumerate(groups):
        fill_expert(experts, i, dense, units)
    if experts.shared_bias is not None:
        experts.shared_bias.copy_(dense.b_down)
    return experts, groups


def split_moe(router: Router, experts: Experts, groups: torch.Tensor) -> MoE:
    """The MoE layer of a neuron split, carrying which dense units each expert holds."""
    moe = MoE(router, experts)
    moe.register_buffer("hidden_units", groups, persistent=True)
    return moe


@register_method(
    "neuron_split",
    paper="https://arxiv.org/abs/2110.01786",
    description="split the FFN's hidden units into E equal experts (balanced k-means or random); shared W2 bias",
    options=NeuronSplitOptions,
)
@torch.no_grad()
def neuron_split(dense: DenseFFN, config, generator: torch.Generator) -> MoE:
    experts, groups = split_experts(dense, config.num_experts, NeuronSplitOptions(**config.options), generator)
    router = build_recipe_router(config, dense.d_model, config.num_experts, generator, unit_weights=True)
    return split_moe(router, experts, groups)
