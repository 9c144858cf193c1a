"""Calibration statistics for MoE Jetpack recycling (arXiv 2406.04801 §3.1) equal a hand computation from hooks
on the model's own FFN submodules, whatever the batching."""

import pytest
import timm
import torch

import upcycle  # noqa: F401  (applies the torchvision fix before timm builds models)
from tests.conversion.tiny_models import build
from upcycle.methods.jetpack.calibration import collect_ffn_statistics


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1,
                              embed_dim=32, depth=2, num_heads=2, num_classes=10)  # fmt: skip
    return model.eval()


def hand_statistics(model, images, mlp_name, hidden_module, switch_module):
    """Hooks: the MLP's input and output, the hidden activations (``hidden_module``'s output, or its input when
    ``hidden_module`` is the hidden norm) and the activations that decide activity (``switch_module``'s output)."""
    seen = {}
    mlp = model.get_submodule(mlp_name)
    hooks = [
        mlp.register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o)),
        switch_module.register_forward_hook(lambda m, a, o: seen.update(switch=o)),
        hidden_module.register_forward_hook(
            lambda m, a, o: seen.update(hidden=a[0] if isinstance(m, torch.nn.LayerNorm) else o)
        ),
    ]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    channels_first = seen["x"].ndim == 4 and isinstance(mlp.fc1, torch.nn.Conv2d)

    def tokens(t):  # -> [t, features]
        return (t.movedim(1, -1) if channels_first else t).reshape(-1, t.shape[1 if channels_first else -1])

    x, y, hidden, switch = (tokens(seen[k]).double() for k in ("x", "y", "hidden", "switch"))
    active = (switch > 0).double()
    return {
        "hidden_importance": hidden.norm(dim=0),
        "channel_importance": (x.norm(dim=0) + y.norm(dim=0)) / 2,
        "coactivation": active.T @ active,
        "tokens": x.shape[0],
    }


def assert_matches(stats, hand):
    torch.testing.assert_close(stats.hidden_importance.double(), hand["hidden_importance"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.channel_importance.double(), hand["channel_importance"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.coactivation, hand["coactivation"], rtol=0, atol=0)
    assert stats.tokens == hand["tokens"]


def test_vit_statistics_match_hooks_on_fc1_and_act():
    model = tiny_vit()
    images = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    stats = collect_ffn_statistics(model, images, batch_size=2)  # batches of 2, 2, 1
    assert list(stats) == ["blocks.0.mlp", "blocks.1.mlp"]
    mlp = model.blocks[0].mlp
    hand = hand_statistics(model, images, "blocks.0.mlp", mlp.act, mlp.fc1)  # active: pre-activation > 0
    assert hand["tokens"] == 5 * (16 + 1)  # 4×4 patches + class token per image
    assert_matches(stats["blocks.0.mlp"], hand)
    assert stats["blocks.0.mlp"].hidden_importance.shape == (128,)
    assert stats["blocks.0.mlp"].coactivation.diagonal().max() <= hand["tokens"]
    assert 0 < hand["coactivation"].mean() < hand["tokens"]  # the test is not trivially all-on or all-off


@pytest.mark.parametrize(("case", "shape"), [("convnext_conv", (2, 3, 32, 32)), ("eva02_swiglu_norm", (2, 3, 28, 28))])
def test_channels_first_and_gated_ffns(case, shape):
    model = build(case)
    images = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    stats = collect_ffn_statistics(model, images, batch_size=1)
    if case == "convnext_conv":
        name = "stages.0.blocks.0.mlp"
        mlp = model.get_submodule(name)
        hand = hand_statistics(model, images, name, mlp.act, mlp.act)
    else:  # SwiGLU with a hidden LayerNorm: importance is the gated product (the norm's input), activity the gate
        name = "blocks.0.mlp"
        mlp = model.get_submodule(name)
        hand = hand_statistics(model, images, name, mlp.norm, mlp.act)
    assert_matches(stats[name], hand)


def test_site_selection_mode_and_hooks_are_restored():
    model = tiny_vit().train()
    images = torch.randn(3, 1, 8, 8)
    stats = collect_ffn_statistics(model, images, sites=["blocks.1.mlp"], coactivation=False, progress=True)
    assert list(stats) == ["blocks.1.mlp"] and stats["blocks.1.mlp"].coactivation is None
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="unknown FFN sites"):
        collect_ffn_statistics(model, images, sites=["blocks.7.mlp"])
    with pytest.raises(ValueError, match="batch_size"):
        collect_ffn_statistics(model, images, batch_size=0)


def test_running_totals_are_float64_on_the_ffns_device():
    """Sums over millions of calibration tokens stay exact in float64 (module docstring); counts included."""
    from upcycle.adapters.dense_ffn import DenseFFN
    from upcycle.methods.jetpack.calibration import _Accumulator

    dense = DenseFFN(w_up=torch.randn(6, 4), w_down=torch.randn(4, 6), activation="relu")
    accumulator = _Accumulator(dense, channels_first=False, threshold=0.0, coactivation=True)
    for total in (accumulator.hidden_sq, accumulator.input_sq, accumulator.output_sq, accumulator.coactivation):
        assert total.dtype == torch.float64 and total.device == dense.w_up.device
    accumulator(None, (torch.randn(3, 4),), None)
    assert accumulator.result().coactivation.dtype == torch.float64 and accumulator.tokens == 3


def test_a_unit_is_active_only_above_the_threshold():
    """ReLU units at exactly 0 (the threshold) are off: co-activation counts tokens with switch > threshold."""
    from upcycle.adapters.dense_ffn import DenseFFN
    from upcycle.methods.jetpack.calibration import _Accumulator

    dense = DenseFFN(w_up=torch.eye(2), w_down=torch.eye(2), activation="relu")
    accumulator = _Accumulator(dense, channels_first=False, threshold=0.0, coactivation=True)
    accumulator(None, (torch.tensor([[1.0, -1.0], [2.0, 0.0], [0.0, 0.0]]),), None)
    assert accumulator.result().coactivation.tolist() == [[2.0, 0.0], [0.0, 0.0]]
