"""Parameter counts by hand: total, active (top-k, slots, dynamic), routers, shared parts, tied weights."""

import copy

import pytest
import torch
from torch import nn

import upcycle
from upcycle.eval import count_parameters
from upcycle.layers import FFN, Experts, MoE, Router, SoftMoERouter, TopKRouter

from .helpers import FixedRouter

D, H, E = 8, 6, 4
PER_EXPERT = H * D + H + D * H + D  # w_up, b_up, w_down, b_down = 110


def model_with(router, **moe_kwargs):
    return nn.Sequential(nn.Linear(D, D), MoE(router, Experts(E, D, H), **moe_kwargs))


def test_top2_of_4_by_hand():
    counts = count_parameters(model_with(TopKRouter(D, E, top_k=2)))
    dense, router = D * D + D, D * E  # the Linear; the bias-free gate
    assert counts["experts_total"] == E * PER_EXPERT == 440
    assert counts["experts_active"] == 2 * PER_EXPERT
    assert counts["router"] == router
    assert counts["total"] == dense + router + E * PER_EXPERT
    assert counts["active"] == dense + router + 2 * PER_EXPERT
    assert counts["shared"] == 0


def test_slot_router_uses_every_expert():
    counts = count_parameters(model_with(SoftMoERouter(D, E, slots_per_expert=2)))
    assert counts["experts_active"] == counts["experts_total"] == E * PER_EXPERT
    assert counts["router"] == E * 2 * D  # slot queries
    assert counts["active"] == counts["total"]


def test_dynamic_router_reports_all_experts_unless_measured():
    model = model_with(FixedRouter(D, E, torch.zeros(1, 2, dtype=torch.long)))
    assert count_parameters(model)["experts_active"] == E * PER_EXPERT
    assert count_parameters(model, experts_per_token=1.5)["experts_active"] == 1.5 * PER_EXPERT
    assert count_parameters(model, experts_per_token={"1": 1.0})["experts_active"] == PER_EXPERT
    # a fixed top-k layer ignores a measured figure
    assert count_parameters(model_with(TopKRouter(D, E, top_k=2)), 1.0)["experts_active"] == 2 * PER_EXPERT


def test_shared_expert_gate_and_bias_count_as_shared_and_active():
    experts = Experts(E, D, H, bias=(True, False), shared_bias=True)
    model = MoE(TopKRouter(D, E, top_k=1), experts, shared_expert=FFN(D, 5), shared_expert_gate=True)
    counts = count_parameters(model)
    routed = H * D + H + D * H  # no per-expert b_down: it is the shared bias
    shared = D + (D * 5 + 5 + 5 * D + D) + D  # shared bias + shared FFN + sigmoid gate
    assert counts["experts_total"] == E * routed
    assert counts["shared"] == shared
    assert counts["active"] == counts["total"] - E * routed + routed


def test_converted_llama_with_tied_embeddings(dense_llama):
    dense = copy.deepcopy(dense_llama)
    dense.config.tie_word_embeddings = True
    dense.lm_head.weight = dense.model.embed_tokens.weight
    moe = upcycle.convert(dense, "sparse_upcycling", num_experts=4, top_k=2, progress=False)
    counts = count_parameters(moe)
    experts = 3 * 4 * 3 * 32 * 64  # layers × experts × (gate, up, down) × d × h, no biases
    assert counts["experts_total"] == experts
    assert counts["router"] == 3 * 32 * 4
    assert counts["total"] == sum(p.numel() for p in dense.parameters()) - 3 * 3 * 32 * 64 + experts + 3 * 32 * 4
    assert counts["active"] == counts["total"] - experts // 2
    assert counts["total"] < sum(p.numel() for p in moe.state_dict().values())  # the tied head counted once


@pytest.mark.parametrize("name", ["topk", "sigmoid", "cmoe", "moefication"])
def test_every_router_with_a_fixed_k_counts_k_experts(name):
    # CMoE and sigmoid routers were once counted as using every expert (a CMoE model reported all its parameters)
    router = upcycle.layers.build_router(name, d_model=D, num_experts=E, top_k=3)
    counts = count_parameters(model_with(router), experts_per_token=1.0)  # a measured figure does not apply
    assert counts["experts_active"] == 3 * PER_EXPERT


@pytest.mark.parametrize("k", [1, 3])
def test_active_scales_with_k(k):
    counts = count_parameters(model_with(TopKRouter(D, E, top_k=k)))
    assert counts["experts_active"] == k * PER_EXPERT


def test_experts_shared_by_two_layers_count_once():
    first = MoE(TopKRouter(D, E, top_k=2), Experts(E, D, H))
    second = MoE(TopKRouter(D, E, top_k=2), first.experts)  # the same expert weights, a second router
    counts = count_parameters(nn.Sequential(first, second))
    assert counts["experts_total"] == E * PER_EXPERT
    assert counts["experts_active"] == 2 * PER_EXPERT
    assert counts["total"] == E * PER_EXPERT + 2 * D * E  # parameters() yields the shared experts once
    assert counts["active"] == counts["total"] - (E - 2) * PER_EXPERT


class Unregistered(Router):
    """A router class that was never registered (no registry name): neither top-k nor slots."""

    def forward(self, x):
        raise NotImplementedError


def test_unregistered_router_uses_every_expert_unless_measured():
    model = model_with(Unregistered(D, E))
    assert count_parameters(model)["experts_active"] == E * PER_EXPERT
    assert count_parameters(model, experts_per_token=3.0)["experts_active"] == 3 * PER_EXPERT


def test_slot_router_ignores_a_measured_figure():
    model = model_with(SoftMoERouter(D, E, slots_per_expert=2))
    assert count_parameters(model, experts_per_token=1.0)["experts_active"] == E * PER_EXPERT


def test_shared_parts_of_every_layer_add_up():
    def layer():
        return MoE(TopKRouter(D, E, top_k=1), Experts(E, D, H), shared_expert=FFN(D, 5), shared_expert_gate=True)

    one, two = count_parameters(layer()), count_parameters(nn.Sequential(layer(), layer()))
    assert one["shared"] == (D * 5 + 5 + 5 * D + D) + D  # the shared FFN and its sigmoid gate
    assert {key: 2 * value for key, value in one.items()} == two


def test_moefication_router_counts_its_fixed_top_k():
    from upcycle.layers import build_router

    router = build_router("moefication", d_model=D, num_experts=E, hidden=4, top_k=3)
    assert count_parameters(model_with(router), experts_per_token=1.0)["experts_active"] == 3 * PER_EXPERT
