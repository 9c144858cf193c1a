"""The MoE layer accepts any leading dims, collects aux losses explicitly, switches backends, reports stats."""

import pytest
import torch
from torch import nn

from upcycle.layers import (
    FFN,
    Experts,
    MoE,
    SoftMoERouter,
    TopKRouter,
    collect_aux_losses,
    moe_layers,
    routing_statistics,
    set_backend,
)
from upcycle.layers.routing import Routing


@pytest.mark.parametrize("shape", [(2, 65, 16), (2, 4, 4, 16), (16,), (7, 16), (1, 16)])
@pytest.mark.parametrize("router_kind", ["topk", "soft"])
def test_any_leading_dims(shape, router_kind):
    router = TopKRouter(16, 4, top_k=2) if router_kind == "topk" else SoftMoERouter(16, 4, slots_per_expert=2)
    layer = MoE(router, Experts(4, 16, 8))
    x = torch.randn(shape)
    assert layer(x).shape == x.shape


def test_token_routing_is_per_token():
    """Sparse routing treats tokens independently: a ConvNeXt grid equals its flattened tokens."""
    layer = MoE(TopKRouter(16, 4, top_k=2, init_std=1.0), Experts(4, 16, 8))
    grid = torch.randn(2, 3, 3, 16)
    torch.testing.assert_close(layer(grid).reshape(-1, 16), layer(grid.reshape(-1, 16)))


def test_shared_expert_with_gate():
    shared = FFN(16, 8, activation="silu", gated=True)
    layer = MoE(TopKRouter(16, 4, top_k=2), Experts(4, 16, 8), shared_expert=shared, shared_expert_gate=True)
    x = torch.randn(5, 16)
    y_routed, _ = MoE(layer.router, layer.experts).forward_with_routing(x)
    gate = torch.sigmoid(layer.shared_expert_gate(x))
    torch.testing.assert_close(layer(x), y_routed + gate * shared(x))


def test_collect_aux_losses_and_backend_switch():
    model = nn.Sequential(
        MoE(TopKRouter(8, 4, top_k=2), Experts(4, 8, 4)), nn.GELU(), MoE(TopKRouter(8, 4, top_k=1), Experts(4, 8, 4))
    )
    assert collect_aux_losses(model) == {}
    model(torch.randn(10, 8))
    losses = collect_aux_losses(model)
    expected = (model[0].last_routing.aux_losses["z_loss"] + model[2].last_routing.aux_losses["z_loss"]) / 2
    torch.testing.assert_close(losses["z_loss"], expected)
    set_backend(model, "eager")
    assert [layer.experts.backend for _, layer in moe_layers(model)] == ["eager", "eager"]
    assert [name for name, _ in moe_layers(model)] == ["0", "2"]


def test_statistics_sparse_hand_case():
    indices = torch.tensor([[0, 1], [0, 2], [0, 1]])
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    probs = torch.full((3, 4), 0.25)
    routing = Routing(4, indices=indices, weights=torch.ones(3, 2), mask=mask, router_probs=probs)
    stats = routing_statistics(routing)
    assert stats["load"] == pytest.approx([2 / 3, 1 / 3, 0, 0])
    assert stats["dead_experts"] == 2
    assert stats["dropped_pairs"] == pytest.approx(0.5)
    assert stats["dropped_tokens"] == pytest.approx(1 / 3)
    assert stats["entropy"] == pytest.approx(stats["max_entropy"])


def test_statistics_slots():
    layer = MoE(SoftMoERouter(8, 3, 2), Experts(3, 8, 4))
    layer(torch.randn(2, 5, 8))
    stats = routing_statistics(layer.last_routing)
    assert len(stats["load"]) == 3 and sum(stats["load"]) == pytest.approx(1.0)
    assert 0 < stats["entropy"] <= stats["max_entropy"]
