"""Small models and routers with hand-computable costs, shared by the eval tests."""

import torch
from torch import nn

from upcycle.layers import Experts, MoE, Router, Routing, TopKRouter


class FixedRouter(Router):
    """Routes every call with the same sparse choice, so which pairs run is known by hand (a "dynamic" router:
    its registry name is not topk)."""

    registry_name = "fixed_test"

    def __init__(self, d_model, num_experts, indices, mask=None):
        super().__init__(d_model, num_experts)
        self.register_buffer("indices", indices)
        self.register_buffer("mask", mask)

    def forward(self, x):  # x [t, d]; t must equal the number of rows of indices
        weights = torch.ones(self.indices.shape, dtype=x.dtype)
        return Routing(self.num_experts, indices=self.indices, weights=weights, mask=self.mask)


def topk_moe(d=16, h=24, e=4, k=2, gated=False, capacity_factor=None, backend="grouped", **kwargs):
    router = TopKRouter(d, e, top_k=k, capacity_factor=capacity_factor)
    nn.init.normal_(router.gate.weight, std=1.0)  # spread tokens, so loads differ and the grouped buffer pads
    return MoE(router, Experts(e, d, h, gated=gated, backend=backend), **kwargs).eval()
