"""SpheroMoE router: shapes and softmax axes, entmax combine, cosine logits and temperatures, noise, the layer."""

import pytest
import torch

from upcycle.layers import DualPathExperts, MoE, build_router
from upcycle.methods.jetpack.sphero import SpheroMoERouter


def test_shapes_and_normalisation_axes():
    router = SpheroMoERouter(16, num_experts=3, slots_per_expert=2)
    routing = router(torch.randn(4, 9, 16))
    assert routing.dispatch.shape == routing.combine.shape == routing.router_logits.shape == (4, 9, 6)
    assert routing.slots_per_expert == 2 and routing.num_experts == 3
    torch.testing.assert_close(routing.dispatch.sum(1), torch.ones(4, 6))  # each slot mixes tokens
    torch.testing.assert_close(routing.combine.sum(2), torch.ones(4, 9))  # each token mixes slots


def test_entmax_combine_sums_to_one_with_exact_zeros():
    router = SpheroMoERouter(16, num_experts=4, slots_per_expert=2, combine="entmax15", temperature_init=0.05)
    routing = router(torch.randn(3, 7, 16))
    torch.testing.assert_close(routing.combine.sum(2), torch.ones(3, 7))
    torch.testing.assert_close(routing.dispatch.sum(1), torch.ones(3, 8))  # dispatch stays a softmax
    assert (routing.combine == 0).any() and (routing.dispatch > 0).all()


@pytest.mark.parametrize("temperatures", ["one", "two"])
def test_cosine_logits_times_temperature_lie_in_unit_interval(temperatures):
    router = SpheroMoERouter(16, 5, temperatures=temperatures, temperature_init=0.3).eval()
    routing = router(10 * torch.randn(2, 11, 16))  # token scale must not matter with key_norm
    _, tau_combine = router.temperatures()
    cosine = routing.router_logits * tau_combine
    assert cosine.abs().max() <= 1 + 1e-5
    assert cosine.abs().max() > 0.3  # not trivially small
    # the dispatch read L / τ_d from the same cosines
    expected = torch.softmax(cosine / router.temperatures()[0], dim=1)
    torch.testing.assert_close(routing.dispatch, expected.detach(), rtol=1e-5, atol=1e-6)


def test_without_key_norm_logits_keep_the_key_scale():
    router = SpheroMoERouter(16, 5, key_norm=False).eval()
    x = torch.randn(2, 11, 16)
    torch.testing.assert_close(router(3 * x).router_logits, 3 * router(x).router_logits, rtol=1e-5, atol=1e-5)


def test_key_projection_starts_at_identity_and_is_learnable():
    plain = SpheroMoERouter(16, 4).eval()
    projected = SpheroMoERouter(16, 4, key_projection=True).eval()
    projected.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(projected(x).combine, plain(x).combine)
    projected(x).combine.square().sum().backward()
    assert projected.key_projection.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("temperatures,count", [("one", 1), ("two", 2)])
def test_temperatures_positive_and_get_gradients(temperatures, count):
    router = SpheroMoERouter(8, 3, temperatures=temperatures, temperature_init=0.5)
    temperature_params = [name for name, _ in router.named_parameters() if "temperature" in name]
    assert temperature_params == ["log_temperature"] and router.log_temperature.numel() == count
    torch.testing.assert_close(torch.stack(router.temperatures()), torch.tensor([0.5, 0.5]))
    routing = router(torch.randn(2, 6, 8))
    (routing.dispatch[..., 0].square().sum() + routing.combine[..., 0].square().sum()).backward()
    grad = router.log_temperature.grad
    assert grad is not None and (grad != 0).all()
    with torch.no_grad():  # an optimiser step far past zero leaves τ positive
        router.log_temperature -= 100
    assert all(tau > 0 for tau in router.temperatures())


def test_two_temperatures_are_separate():
    router = SpheroMoERouter(8, 3, temperatures="two").eval()
    x = torch.randn(2, 6, 8)
    before = router(x)
    with torch.no_grad():
        router.log_temperature[1] += 1.0  # combine only
    after = router(x)
    torch.testing.assert_close(after.dispatch, before.dispatch)
    assert not torch.allclose(after.combine, before.combine)


def test_noise_only_in_training():
    router = SpheroMoERouter(16, 4, noise_std=0.5)
    x = torch.randn(2, 9, 16)
    router.eval()
    assert torch.equal(router(x).combine, router(x).combine)
    router.train()
    assert not torch.equal(router(x).combine, router(x).combine)
    noiseless = SpheroMoERouter(16, 4).train()
    assert torch.equal(noiseless(x).combine, noiseless(x).combine)


def test_orthogonal_queries_and_spec_rebuilds():
    router = SpheroMoERouter(16, 4, slots_per_expert=2, key_projection=True, temperatures="one", combine="entmax15")
    q = router.slot_queries.detach()
    torch.testing.assert_close(q @ q.T, torch.eye(8), atol=1e-5, rtol=0)
    spec = router.spec()
    assert spec["name"] == "sphero"
    rebuilt = build_router(**spec)
    assert rebuilt.spec() == spec
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in router.state_dict().items()}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"temperatures": "three"}, "temperatures must be 'one'"),
        ({"temperature_init": 0.0}, "temperature_init must be > 0"),
        ({"combine": "sparsemax"}, "combine must be 'softmax' or 'entmax15'"),
        ({"noise_std": -1.0}, "noise_std must be >= 0"),
        ({"slots_per_expert": 0}, "slots_per_expert must be >= 1"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpheroMoERouter(8, 4, **kwargs)


@pytest.mark.parametrize("combine", ["softmax", "entmax15"])
def test_tiny_layer_forward_backward(combine):
    router = SpheroMoERouter(16, 6, slots_per_expert=2, key_projection=True, combine=combine, noise_std=0.01)
    layer = MoE(router, DualPathExperts.create(2, 4, 16, 32, expert_dropout=0.1))
    assert (layer.experts.core.d_hidden, layer.experts.universal.d_hidden) == (32, 8)
    x = torch.randn(3, 5, 16, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for name in ("router.slot_queries", "router.log_temperature", "router.key_projection.weight"):
        assert layer.get_parameter(name).grad.abs().sum() > 0, name


@pytest.mark.parametrize("noise_on", ["cosines", "logits"])
def test_noise_lands_where_noise_on_says(noise_on):
    """cosines: one draw N on L before the temperatures, combine = softmax((L + N) / τ_c); logits (released code):
    the same draw added after them, combine = softmax(L / τ_c + N), dispatch = softmax(L / τ_d + N)."""
    router = SpheroMoERouter(16, 4, noise_std=0.3, noise_on=noise_on, temperature_init=0.5)
    with torch.no_grad():
        router.log_temperature.copy_(torch.tensor([0.25, 0.5]).log())  # τ_d ≠ τ_c
    x = torch.randn(2, 9, 16)
    clean = router.eval()(x)
    cosines = clean.router_logits * 0.5  # L = (L / τ_c) · τ_c
    torch.manual_seed(7)
    noisy = router.train()(x)
    torch.manual_seed(7)
    noise = 0.3 * torch.randn(2, 9, 4)
    scale_d, scale_c = (4.0, 2.0) if noise_on == "cosines" else (1.0, 1.0)  # noise / τ, or the noise itself
    torch.testing.assert_close(noisy.combine, torch.softmax(cosines / 0.5 + noise * scale_c, dim=2))
    torch.testing.assert_close(noisy.dispatch, torch.softmax(cosines / 0.25 + noise * scale_d, dim=1))


def test_noise_in_eval_keeps_the_noise_on_in_evaluation():
    x = torch.randn(2, 9, 16)
    released = SpheroMoERouter(16, 4, noise_std=0.5, noise_in_eval=True).eval()
    assert not torch.equal(released(x).combine, released(x).combine)
    ours = SpheroMoERouter(16, 4, noise_std=0.5).eval()
    assert torch.equal(ours(x).combine, ours(x).combine)
    with pytest.raises(ValueError, match="noise_on must be 'cosines' or 'logits'"):
        SpheroMoERouter(16, 4, noise_on="slots")
