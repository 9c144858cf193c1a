"""The paper / released-code switches of ``moe_jetpack`` (arXiv 2406.04801) do what they claim: universal experts
thinned from core-width draws, the channel statistic, the mean-pool readout, the Soft MoE router's normalisation and
the released noise scale."""

import pytest
import torch

import upcycle
from tests.methods.jetpack.helpers import jetpack, vit
from upcycle.layers import moe_layers
from upcycle.methods.jetpack.calibration import channel_scores, collect_ffn_statistics
from upcycle.methods.jetpack.recycling import JetpackOptions, calibration_images
from upcycle.methods.jetpack.sampling import uniform_selection
from upcycle.pretrain import build_dense


def test_wide_then_thin_keeps_evenly_spaced_units_of_core_width_draws(predecessor):
    """Released convert_vit_to_dualpath: each universal expert is a core-width (h) set, thinned to the same
    round(linspace(0, h-1, h/4)) positions; ``direct`` draws h/4 units straight away."""
    sizes = {"strategy": "uniform", "core_experts": 2, "universal_experts": 2}
    thin = moe_layers(jetpack(vit(32), predecessor, universal_sampling="wide_then_thin", **sizes))[0][1]
    direct = moe_layers(jetpack(vit(32), predecessor, **sizes))[0][1]
    h, h_univ = thin.experts.core.d_hidden, thin.experts.universal.d_hidden  # 128, 32 of the predecessor's 256
    positions = torch.linspace(0, h - 1, h_univ).round().long()
    assert torch.equal(thin.universal_hidden_units, uniform_selection(256, 2, h)[:, positions])
    assert torch.equal(direct.universal_hidden_units, uniform_selection(256, 2, h_univ))
    assert not torch.equal(thin.universal_hidden_units, direct.universal_hidden_units)
    assert torch.equal(thin.core_hidden_units, direct.core_hidden_units)
    universal = thin.experts.universal.w_up[0]  # the thinned units' rows of the predecessor's fc1 (shared channels)
    wide = upcycle.load(predecessor).blocks[1].mlp.fc1.weight
    assert torch.equal(universal, wide[thin.universal_hidden_units[0]][:, thin.expert_channels[-1]])


def test_the_channel_statistic_picks_the_shared_channels(tmp_path):
    wide = vit(64, seed=1)
    with torch.no_grad():
        wide.blocks[1].mlp.fc2.weight.mul_(30)  # outputs as large as inputs, so the two statistics rank apart
    predecessor = tmp_path / "wide"
    upcycle.save(wide, predecessor)
    images = calibration_images(wide, JetpackOptions(calibration_data="digits", calibration_images=24))
    stats = collect_ffn_statistics(wide, images, sites=["blocks.1.mlp"], coactivation=False)["blocks.1.mlp"]
    chosen = {}
    for kind in ("input", "input_output"):
        layer = moe_layers(jetpack(vit(32), predecessor, channel_statistic=kind))[0][1]
        chosen[kind] = layer.expert_channels[0]
        assert torch.equal(chosen[kind], channel_scores(stats, kind).topk(32).indices.sort().values)
    assert not torch.equal(chosen["input"], chosen["input_output"])
    # input: the L2 norm of what the FFN reads, the block's norm2 output (the released code's statistic)
    seen = []
    hook = wide.blocks[1].norm2.register_forward_hook(lambda module, args, out: seen.append(out.reshape(-1, 64)))
    with torch.no_grad():
        wide.eval()(images)
    hook.remove()
    torch.testing.assert_close(stats.input_importance, torch.cat(seen).norm(dim=0))


def test_mean_pool_readout_averages_patch_tokens_into_a_fresh_norm(tmp_path):
    model = vit(32)
    moe = jetpack(model, readout="mean_pool").eval()
    assert moe.global_pool == "avg" and isinstance(moe.norm, torch.nn.Identity)
    assert torch.equal(moe.fc_norm.weight, torch.ones(32)) and torch.equal(moe.fc_norm.bias, torch.zeros(32))
    x = torch.randn(3, 1, 8, 8)
    tokens = moe.forward_features(x)  # [b, 1 + 16, d], no final norm
    expected = moe.head(torch.nn.functional.layer_norm(tokens[:, 1:].mean(1), (32,), eps=model.norm.eps))
    torch.testing.assert_close(moe(x), expected)
    kept = jetpack(model).eval()  # class_token: the checkpoint's own readout
    assert kept.global_pool == "token" and torch.equal(kept.norm.weight, model.norm.weight)
    upcycle.save(moe, tmp_path / "moe")
    torch.testing.assert_close(upcycle.load(tmp_path / "moe").eval()(x), moe(x))


def test_mean_pool_readout_refuses_a_model_without_a_class_token_readout():
    convnext = build_dense("timm:convnext_atto", in_chans=1, num_classes=10, pretrained_cfg_overlay={"input_size":
                           [1, 32, 32]})  # fmt: skip
    with pytest.raises(ValueError, match=r"ConvNeXt.*a mean-pool readout is not supported; use readout=class_token"):
        upcycle.convert(convnext, "moe_jetpack", layers=[4], calibration_data="digits", calibration_images=4,
                        readout="mean_pool", progress=False)  # fmt: skip
    pooled = vit(32, global_pool="avg")  # a ViT that pools already: no class-token readout to swap
    with pytest.raises(ValueError, match=r"replaces a ViT's class-token readout .* this model has none"):
        jetpack(pooled, readout="mean_pool")


def test_the_soft_router_is_normalised_unless_switched_off():
    sizes = {"slot_router": "soft", "core_experts": 2, "universal_experts": 1}
    on = moe_layers(jetpack(vit(32), **sizes))[0][1].router
    off = moe_layers(jetpack(vit(32), soft_normalize=False, **sizes))[0][1].router
    assert on.normalize and on.scale is not None and not off.normalize
    x = 50 * torch.randn(2, 17, 32)
    assert on(x).router_logits.abs().max() <= on.scale.abs() + 1e-5  # cosines times the learnable scale
    assert off(x).router_logits.abs().max() > 1


def test_released_noise_is_one_over_the_expert_count():
    router = moe_layers(jetpack(vit(32), core_experts=2, universal_experts=3, router_noise_std=1.0,
                                noise_per_expert=True, noise_on="logits", noise_in_eval=True))[0][1].router  # fmt: skip
    assert router.noise_std == pytest.approx(1 / 5) and router.noise_on == "logits" and router.noise_in_eval
    plain = moe_layers(jetpack(vit(32), core_experts=2, universal_experts=3, router_noise_std=1.0))[0][1].router
    assert plain.noise_std == 1.0 and plain.noise_on == "cosines" and not plain.noise_in_eval
