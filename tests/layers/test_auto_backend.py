"""The default ``auto`` backend: which backend each kind of call runs, and that it returns exactly what that backend
returns (its match with the eager reference, outputs and gradients, is in test_backends.py with every backend)."""

import pytest
import torch

from upcycle.layers.backends import get_backend
from upcycle.layers.backends.auto import LARGE_GROUPS, choose

from .helpers import random_experts, random_sparse_routing

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("experts", "pairs", "masked", "training", "expected"),
    [
        (8, 1 * 2, False, False, "grouped"),  # decoding one token: grouped's per-pair path
        (64, 512 * 8, False, False, "grouped"),  # 64 rows per expert
        (64, 512 * 8, False, True, "grouped_mm"),
        (8, 4096 * 2, False, False, "sorted"),  # 1,024 rows per expert
        (64, 4096 * 8, False, True, "sorted"),  # 512: the threshold itself
        (64, LARGE_GROUPS * 64 - 1, False, True, "grouped_mm"),
        (16, 300, True, False, "sorted"),  # dynamic-k: unbalanced loads, no padding
        (16, 300, True, True, "grouped_mm"),
    ],
)
def test_choice_follows_rows_per_expert_mask_and_autograd(experts, pairs, masked, training, expected):
    assert choose(experts, pairs, masked, training, CPU) == expected


def test_other_devices_get_the_grouped_kernel():
    assert choose(8, 2, False, False, torch.device("meta")) == "grouped_mm"


@pytest.mark.parametrize(("t", "with_mask"), [(1, False), (40, False), (1100, False), (40, True)])
@pytest.mark.parametrize("grad", [False, True])
def test_auto_returns_what_the_chosen_backend_returns(t, with_mask, grad):
    experts = random_experts(e=4, d=8, h=8, gated=True)  # 1,100 tokens at top-2: 550 rows per expert -> sorted
    x = torch.randn(t, 8)
    routing = random_sparse_routing(t, 4, 2, with_mask=with_mask, requires_grad=False)
    pairs = routing.indices.numel() if routing.mask is None else int(routing.mask.sum())
    name = choose(4, pairs, with_mask, grad, CPU)
    with torch.set_grad_enabled(grad):
        auto = get_backend("auto")(experts, x, routing.indices, routing.weights, routing.mask)
        chosen = get_backend(name)(experts, x, routing.indices, routing.weights, routing.mask)
    torch.testing.assert_close(auto, chosen, rtol=0, atol=0)
