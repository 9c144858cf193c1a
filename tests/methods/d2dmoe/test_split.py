"""Balanced k-means of the neuron split (MoEfication / D2DMoE) groups what belongs together: it recovers planted
clusters, its objective beats random balanced partitions, and every group has exactly h/E units."""

import pytest
import torch
import torch.nn.functional as F

from upcycle.adapters.dense_ffn import DenseFFN
from upcycle.methods.d2dmoe.split import _balanced_assign, balanced_kmeans, partition_hidden_units


def planted(clusters: int, size: int, d: int = 16, spread: float = 0.05, seed: int = 0):
    """Points around ``clusters`` random directions, shuffled -> (points [c·size, d], true label of each)."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(clusters, d, generator=g), dim=-1)
    labels = torch.arange(clusters).repeat_interleave(size)
    points = centres[labels] + spread * torch.randn(clusters * size, d, generator=g)
    order = torch.randperm(clusters * size, generator=g)
    return points[order] * torch.rand(clusters * size, 1, generator=g).add(0.5), labels[order]  # scale: irrelevant


def objective(points: torch.Tensor, groups: torch.Tensor) -> float:
    """Spherical k-means objective: total cosine similarity of each point to its group's normalised mean."""
    unit = F.normalize(points, dim=-1)
    return sum(float((unit[g] @ F.normalize(unit[g].sum(0), dim=0)).sum()) for g in groups)


def check_balanced(groups: torch.Tensor, h: int, clusters: int) -> None:
    assert groups.shape == (clusters, h // clusters)
    assert torch.equal(groups.flatten().sort().values, torch.arange(h))


@pytest.mark.parametrize(("clusters", "size", "d"), [(6, 8, 16), (4, 4, 8), (8, 4, 16)])
def test_recovers_planted_clusters(clusters, size, d):
    """Small groups too: seeds drawn uniformly often start two centroids in one group, which a balanced
    assignment never separates again; spread seeds do not."""
    for seed in range(8):
        points, labels = planted(clusters, size, d, seed=seed)
        groups = balanced_kmeans(points, clusters, iterations=25, generator=torch.Generator().manual_seed(seed))
        check_balanced(groups, clusters * size, clusters)
        found = sorted(sorted(labels[g].tolist()) for g in groups)
        assert found == [[c] * size for c in range(clusters)], seed


def test_objective_beats_random_partitions():
    points, _ = planted(clusters=4, size=16, spread=0.6, seed=3)
    groups = balanced_kmeans(points, 4, iterations=25, generator=torch.Generator().manual_seed(0))
    check_balanced(groups, 64, 4)
    g = torch.Generator().manual_seed(1)
    random = [objective(points, torch.randperm(64, generator=g).view(4, -1)) for _ in range(50)]
    assert objective(points, groups) > max(random) + 5.0


def test_balanced_assignment_prefers_the_most_similar_points():
    similarity = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.6], [0.1, 0.0]])
    # cluster 0 has room for 2: the two most similar (0.9, 0.8) win; the rest go to cluster 1
    assert _balanced_assign(similarity, 2).tolist() == [0, 0, 1, 1]
    assert _balanced_assign(similarity.flip(1), 2).tolist() == [1, 1, 0, 0]


def test_partition_clusters_gate_rows_of_gated_ffns():
    """Gated FFNs are clustered by the gate projection's rows (which decide whether a unit fires), not W_up's."""
    points, labels = planted(clusters=4, size=4, d=8, seed=5)
    g = torch.Generator().manual_seed(0)
    dense = DenseFFN(w_up=torch.randn(16, 8, generator=g), w_down=torch.randn(8, 16, generator=g), activation="silu",
                     w_gate=points)  # fmt: skip
    groups = partition_hidden_units(dense, 4, "kmeans", 25, torch.Generator().manual_seed(0))
    assert sorted(sorted(labels[row].tolist()) for row in groups) == [[c] * 4 for c in range(4)]
    assert torch.equal(groups, groups.sort(dim=1).values)
    plain = DenseFFN(w_up=points, w_down=torch.randn(8, 16, generator=g), activation="relu")
    groups = partition_hidden_units(plain, 4, "kmeans", 25, torch.Generator().manual_seed(0))
    assert sorted(sorted(labels[row].tolist()) for row in groups) == [[c] * 4 for c in range(4)]


def test_random_partition_is_balanced_and_seeded():
    dense = DenseFFN(w_up=torch.randn(12, 4), w_down=torch.randn(4, 12), activation="relu")
    a = partition_hidden_units(dense, 3, "random", 1, torch.Generator().manual_seed(0))
    b = partition_hidden_units(dense, 3, "random", 1, torch.Generator().manual_seed(0))
    check_balanced(a, 12, 3)
    assert torch.equal(a, b) and not torch.equal(a.flatten(), torch.arange(12))


def test_an_expert_count_that_does_not_divide_the_width_suggests_divisors():
    dense = DenseFFN(w_up=torch.randn(12, 4), w_down=torch.randn(4, 12), activation="relu")
    with pytest.raises(ValueError, match=r"5 experts do not divide the FFN hidden size 12.*\(e\.g\. 2, 3, 4, 6, 12\)"):
        partition_hidden_units(dense, 5, "kmeans", 1, torch.Generator())


def test_partition_depends_only_on_the_direction_of_each_row():
    """Spherical k-means: rescaling any unit's weight row (e.g. by a later LayerNorm) changes nothing."""
    points, _ = planted(clusters=4, size=8, spread=0.8, seed=4)
    scales = torch.rand(32, 1, generator=torch.Generator().manual_seed(9)) * 100 + 0.01
    a = balanced_kmeans(points, 4, iterations=25, generator=torch.Generator().manual_seed(0))
    b = balanced_kmeans(points * scales, 4, iterations=25, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_identical_rows_still_split_into_equal_groups():
    """Every row the same direction (e.g. dead units with equal weights): seeding cannot spread, and must not fail."""
    rows = torch.tensor([[2.0, 0.0, 0.0]]).repeat(8, 1)  # cosine distances exactly 0
    groups = balanced_kmeans(rows, 4, iterations=5, generator=torch.Generator().manual_seed(0))
    check_balanced(groups, 8, 4)
