"""Routing statistics aggregated over batches, dead experts, and the expert-load heatmap."""

import pytest
import torch
from torch import nn

import upcycle
from upcycle.eval import collect_routing_stats, plot_expert_load
from upcycle.layers import Experts, MoE, SoftMoERouter, routing_statistics

from .helpers import topk_moe


@pytest.fixture(scope="module")
def vit_moe(dense_vit):
    return upcycle.convert(dense_vit, "sparse_upcycling", num_experts=4, top_k=2, progress=False, router_init_std=1.0)


def test_stats_are_token_weighted_means_of_each_batch(vit_moe):
    batches = [{"x": torch.randn(n, 3, 32, 32), "labels": torch.zeros(n)} for n in (3, 3, 1)]
    stats = collect_routing_stats(vit_moe, batches)
    assert sorted(stats) == ["blocks.0.mlp.moe", "blocks.1.mlp.moe"]
    manual = []
    with torch.no_grad():
        for batch in batches:
            vit_moe(batch["x"])
            manual.append(routing_statistics(vit_moe.blocks[1].mlp.moe.last_routing))
    layer = stats["blocks.1.mlp.moe"]
    tokens = [m["tokens"] for m in manual]
    assert layer["tokens"] == sum(tokens) == 7 * 17 and layer["calls"] == 3
    expected = sum(torch.tensor(m["load"], dtype=torch.float64) * n for m, n in zip(manual, tokens, strict=True)) / sum(
        tokens
    )
    assert torch.allclose(torch.tensor(layer["load"], dtype=torch.float64), expected)
    assert layer["entropy"] == pytest.approx(
        sum(m["entropy"] * n for m, n in zip(manual, tokens, strict=True)) / sum(tokens)
    )
    assert sum(layer["load"]) == pytest.approx(1.0)
    assert layer["dead_experts"] == 0 and layer["dropped_pairs"] == 0 and layer["kind"] == "sparse"


def test_max_batches_and_mode_restored(vit_moe):
    vit_moe.train()
    batches = [{"x": torch.randn(2, 3, 32, 32)} for _ in range(4)]
    stats = collect_routing_stats(vit_moe, batches, max_batches=2)
    assert stats["blocks.0.mlp.moe"]["calls"] == 2
    assert vit_moe.training
    vit_moe.eval()


def test_dead_experts_and_drops():
    moe = topk_moe(e=4, k=2, capacity_factor=0.5)
    with torch.no_grad():  # every token prefers experts 0 and 1: 2 and 3 never run, capacity drops the rest
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[:, 0] = torch.tensor([3.0, 2.0, -1.0, -2.0])
    batches = [{"x": torch.randn(8, 16).abs() + 1} for _ in range(2)]
    layer = collect_routing_stats(moe, batches)[""]
    assert layer["dead_experts"] == 2
    assert layer["load"][2] == layer["load"][3] == 0.0
    # capacity ceil(0.5·8·2/4) = 2 per expert: first choices of tokens 0, 1 (expert 0), their second (expert 1)
    assert layer["dropped_pairs"] == 0.75 and layer["dropped_tokens"] == 0.75
    assert layer["tokens"] == 16


def test_slot_router_stats():
    moe = nn.Sequential(MoE(SoftMoERouter(16, 4, slots_per_expert=2), Experts(4, 16, 8)))
    layer = collect_routing_stats(moe, [{"x": torch.randn(2, 5, 16)}])["0"]
    assert layer["kind"] == "slots" and len(layer["load"]) == 4
    assert sum(layer["load"]) == pytest.approx(1.0)
    assert layer["max_entropy"] == pytest.approx(torch.log(torch.tensor(8.0)).item())


def test_heatmap_is_written_atomically(tmp_path):
    stats = {
        "layers.0": {"load": [0.5, 0.25, 0.25, 0.0]},
        "layers.1": {"load": [0.5, 0.5]},  # fewer experts: padded, not an error
    }
    path = plot_expert_load(stats, tmp_path / "plots" / "load.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 1000
    assert [p.name for p in path.parent.iterdir()] == ["load.png"]  # no temporary file left behind
    with pytest.raises(ValueError, match="no routing statistics"):
        plot_expert_load({}, tmp_path / "empty.png")
