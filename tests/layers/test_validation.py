"""Bad configurations fail at construction with a ValueError that says what to change."""

import pytest
import torch

from upcycle.layers import FFN, Experts, MoE, Routing, SoftMoERouter, TopKRouter


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: TopKRouter(8, 4, top_k=5), "top_k must be between 1 and num_experts=4"),
        (lambda: TopKRouter(8, 4, top_k=0), "top_k must be between 1"),
        (lambda: TopKRouter(8, 0, top_k=1), "num_experts must be >= 1"),
        (lambda: TopKRouter(8, 4, noise_std=-1), "noise_std must be >= 0"),
        (lambda: TopKRouter(8, 4, capacity_factor=0), "capacity_factor must be > 0"),
        (lambda: TopKRouter(8, 4, init="xavier"), "router init must be 'zero' or 'normal'"),
        (lambda: SoftMoERouter(8, 4, slots_per_expert=0), "slots_per_expert must be >= 1"),
        (lambda: Experts(0, 8, 4), "num_experts must be >= 1"),
        (lambda: Experts(2, 8, 0), "d_hidden must be >= 1"),
        (lambda: Experts(2, 8, 4, activation="swish2"), "unknown activation 'swish2'"),
        (lambda: Experts(2, 8, 4, backend="fast"), "unknown expert backend 'fast'; choose one of auto, eager, grouped"),
        (lambda: MoE(TopKRouter(8, 3), Experts(4, 8, 4)), "router has 3 experts but experts hold 4"),
        (lambda: MoE(TopKRouter(6, 4), Experts(4, 8, 4)), "router width 6 differs"),
        (lambda: MoE(TopKRouter(8, 4), Experts(4, 8, 4), FFN(6, 4)), "shared expert width 6"),
        (lambda: MoE(TopKRouter(8, 4), Experts(4, 8, 4), shared_expert_gate=True), "needs a shared_expert"),
    ],
)
def test_bad_configuration(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_wrong_input_width():
    layer = MoE(TopKRouter(8, 4), Experts(4, 8, 4))
    with pytest.raises(ValueError, match="expects last dim 8"):
        layer(torch.randn(3, 7))


def test_routing_record_shape_checks():
    with pytest.raises(ValueError, match="exactly one form"):
        Routing(2)
    with pytest.raises(ValueError, match="must have the shape of indices"):
        Routing(2, indices=torch.zeros(3, 2, dtype=torch.long), weights=torch.zeros(3, 1))
    with pytest.raises(ValueError, match="mask"):
        Routing(
            2,
            indices=torch.zeros(3, 2, dtype=torch.long),
            weights=torch.zeros(3, 2),
            mask=torch.ones(3, dtype=torch.bool),
        )
