"""Expert regularisation of the dual-path experts (MoE Jetpack, arXiv 2406.04801): the released variant drops
elements after both expert projections at one rate; drop path zeroes whole examples at its own rate."""

import pytest
import torch

from upcycle.layers import DualPathExperts
from upcycle.layers.routing import Routing


def layer(**kwargs) -> DualPathExperts:
    torch.manual_seed(0)
    experts = DualPathExperts.create(4, 4, 8, 16, bias=(True, True), **kwargs)
    with torch.no_grad():
        experts.core.b_down.fill_(1.0)  # every slot output non-zero unless something drops it
        experts.universal.b_down.fill_(1.0)
    return experts


def identity_routing(b: int) -> Routing:
    """Token i -> slot i -> token i: the layer output is the slot outputs themselves."""
    eye = torch.eye(8).expand(b, 8, 8)
    return Routing(8, dispatch=eye, combine=eye, slots_per_expert=1)


def test_released_variant_drops_elements_after_the_second_projection():
    experts = layer(expert_dropout=0.5, dropout_variant="released").train()
    x = torch.randn(32, 8, 8)
    y = experts(x, identity_routing(32))
    zero = (y == 0).float().mean().item()
    assert 0.35 < zero < 0.65  # element-wise at p = 0.5 (dropout on the hidden units alone leaves the bias)
    kept = y != 0
    reference = experts.eval()(x, identity_routing(32))
    assert not torch.allclose(y[kept], reference[kept] * 2)  # the hidden units were dropped too


def test_drop_path_has_its_own_rate_and_drops_whole_examples():
    x = torch.randn(200, 8, 8)
    experts = layer(expert_dropout=0.0, drop_path=0.5).train()
    y = experts(x, identity_routing(200))
    reference = experts.eval()(x, identity_routing(200))
    dropped = (y == 0).flatten(1).all(1)
    assert 0.3 < dropped.float().mean().item() < 0.7
    torch.testing.assert_close(y[~dropped], 2 * reference[~dropped])  # kept examples rescaled by 1/(1-q)
    # the expert dropout rate no longer doubles as the drop-path rate
    no_path = layer(expert_dropout=0.4, dropout_variant="released").train()(x, identity_routing(200))
    assert not (no_path == 0).flatten(1).all(1).any()


def test_drop_path_survives_the_spec_and_is_off_in_eval():
    experts = layer(expert_dropout=0.1, dropout_variant="released", drop_path=0.25)
    again = DualPathExperts.from_spec(experts.spec())
    assert again.drop_path == 0.25 and again.dropout_variant == "released"
    x = torch.randn(3, 8, 8)
    experts.eval()
    assert torch.equal(experts(x, identity_routing(3)), experts(x, identity_routing(3)))
    with pytest.raises(ValueError, match=r"drop_path must be in \[0, 1\)"):
        layer(drop_path=1.0)
