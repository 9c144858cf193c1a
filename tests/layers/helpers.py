"""Small builders shared by the layer tests."""

import torch

from upcycle.layers import Experts, Routing


def random_experts(
    e=5, d=100, h=37, gated=False, bias=True, shared_bias=False, activation="gelu", dtype=None, hidden_norm=False
):
    experts = Experts(
        e,
        d,
        h,
        activation=activation,
        gated=gated,
        bias=bias,
        shared_bias=shared_bias,
        hidden_norm_eps=1e-6 if hidden_norm else None,
    )
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.3)  # biases and the shared bias non-zero too, so they are exercised
    return experts.to(dtype) if dtype is not None else experts


def random_sparse_routing(t, e, k, with_mask=False, requires_grad=True):
    """Distinct experts per token (as top-k gives) and positive weights."""
    indices = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    weights = torch.rand(t, k).add(0.1).requires_grad_(requires_grad)
    mask = torch.rand(t, k) > 0.3 if with_mask else None
    return Routing(e, indices=indices, weights=weights, mask=mask)
