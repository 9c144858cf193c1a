"""Every timm family with a per-token FFN, on tiny random configs: convert (copies, renormalised top-k) -> the
per-layer verify passes -> a corrupted expert fails it -> timm export -> ``timm.create_model("local-dir:…")`` gives
the same logits -> ``upcycle.save`` / ``load`` too. Families without one are refused with the reason; no tensor of
the source is dropped silently; Swin's layer-wise LR decay follows its parameter names."""

import pytest
import torch
from timm.models import build_model_with_cfg, register_model
from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock
from torch import nn

import upcycle
from upcycle.adapters import adapter_of, find_adapter, get_adapter
from upcycle.adapters.base import MoEFFN, set_submodule
from upcycle.adapters.timm_common import mlp_kind
from upcycle.errors import UserError
from upcycle.sources import load_timm
from upcycle.train.optim import layer_ids


@register_model
def upcycle_test_mixer(pretrained=False, **kwargs):
    """MLP-Mixer at any depth and width: timm's mixer_* entrypoints fix num_blocks and embed_dim."""
    return build_model_with_cfg(MlpMixer, "mixer_s16_224", pretrained, **kwargs)


@register_model
def upcycle_test_resmlp(pretrained=False, **kwargs):
    """ResMLP (Affine norms, LayerScale, a linear token mixer) at any size, as timm's resmlp_* builds it."""
    return build_model_with_cfg(MlpMixer, "resmlp_12_224", pretrained, block_layer=ResBlock, norm_layer=Affine,
                                mlp_ratio=4, **kwargs)  # fmt: skip


_MIXER = {"img_size": 32, "patch_size": 8, "num_blocks": 2, "embed_dim": 16}
_HIERA = {"img_size": 32, "embed_dim": 16, "num_heads": 1, "stages": (1, 1, 1, 1)}
_XCIT = {"img_size": 32, "embed_dim": 16, "depth": 2, "num_heads": 2, "cls_attn_layers": 1}
_EFFICIENTFORMER = {"depths": (1, 1, 1, 2), "embed_dims": (8, 16, 24, 32), "num_vit": 1}
_SWIN = {"img_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 16, "depths": (1, 2), "num_heads": (1, 2)}
_LEVIT = {"img_size": 32, "embed_dim": (16, 24, 32), "depth": (1, 1, 1), "num_heads": (1, 2, 2), "key_dim": 8}
# case -> (timm architecture, small creation arguments, image side, adapter, FFN sites)
CASES = {
    "swin": ("swin_tiny_patch4_window7_224", _SWIN, 32, "timm_swin", 3),
    "swinv2": ("swinv2_tiny_window8_256", _SWIN, 32, "timm_swin", 3),
    "mixer": ("upcycle_test_mixer", _MIXER, 32, "timm_mixer", 2),
    "resmlp": ("upcycle_test_resmlp", _MIXER, 32, "timm_mixer", 2),
    "hiera": ("hiera_tiny_224", _HIERA, 32, "timm_hiera", 4),
    "xcit": ("xcit_nano_12_p16_224", _XCIT, 32, "timm_xcit", 3),
    "efficientformer": ("efficientformer_l1", _EFFICIENTFORMER, 224, "timm_efficientformer", 5),  # attention: 7×7
    "levit": ("levit_128s", _LEVIT, 32, "timm_levit", 5),
    "levit_conv": ("levit_conv_128s", _LEVIT, 32, "timm_levit", 5),
}


def build(case: str) -> nn.Module:
    """The tiny dense model with non-trivial biases, norms and BatchNorm statistics (so that folding them matters)."""
    arch, kwargs, *_ = CASES[case]
    torch.manual_seed(0)
    model = load_timm(arch, None, False, {"num_classes": 5, **kwargs})
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or any(part in name for part in ("norm", "bn", "alpha", "beta")):
                param.add_(0.2 * torch.randn_like(param))
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_()
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    return model.eval()


def images(case: str, batch: int = 2) -> torch.Tensor:
    side = CASES[case][2]
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", list(CASES))
def test_family_converts_verifies_exports_and_reloads(case, tmp_path):
    import timm

    dense = build(case)
    moe = upcycle.convert(dense, "sparse_upcycling", num_experts=3, top_k=2, progress=False).eval()
    record = upcycle.record_of(moe)
    assert (record.adapter, len(record.layers)) == CASES[case][3:]
    result = upcycle.verify(moe, dense)
    assert result.passed(), result.summary()
    assert result.end_to_end <= 1e-5 and result.worst_relative <= 1e-5

    first = next(iter(record.layers))  # the most tokens
    failures = []  # a router may send no token of the example batch to a given expert: corrupt each in turn
    for expert in range(3):
        broken = upcycle.copy_model(moe)
        with torch.no_grad():
            broken.get_submodule(first).moe.experts.w_down[expert].add_(1.0)
        bad = upcycle.verify(broken, dense)
        if not bad.passed():
            failures.append((expert, bad.worst_layer))
    assert failures and all(layer == first for _, layer in failures)

    x = images(case)
    with torch.no_grad():
        expected = moe(x)
    upcycle.export(moe, tmp_path / "timm", format="timm")
    rebuilt = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    assert type(rebuilt) is type(dense)
    upcycle.save(moe, tmp_path / "saved")
    loaded = upcycle.load(tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(loaded(x), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(
    "recipe",
    [{"method": "sparse_upcycling", "num_experts": 2, "top_k": 4, "granularity": 4},  # granular upcycling
     {"method": "neuron_split", "num_experts": 2, "top_k": 2}],  # MoEfication / D2DMoE split, all experts active
    ids=["granular", "neuron_split"],
)  # fmt: skip
def test_granular_upcycling_and_a_whole_neuron_split_equal_dense(case, recipe):
    dense = build(case)
    result = upcycle.verify(upcycle.convert(dense, progress=False, **recipe), dense)
    assert result.passed(), result.summary()


@pytest.mark.parametrize("case", list(CASES))
def test_the_relu_stage_swaps_the_ffn_activations_only_and_survives_save_and_load(case, tmp_path):
    """D2DMoE's first stage puts ReLU in every FFN; the saved model must rebuild that way whatever ``act_layer``
    the timm constructor takes, and keep every other activation (LeViT's attention, Mixer's token MLP)."""
    model = build(case)
    before = {name: type(module) for name, module in model.named_modules()}
    sites = [site.name for site in find_adapter(model).ffn_sites(model)]
    assert find_adapter(model).swap_activations_to_relu(model) == len(sites)
    upcycle.save(model, tmp_path / "relu")
    loaded = upcycle.load(tmp_path / "relu")
    changed = {name for name, module in loaded.named_modules() if type(module) is not before[name]}
    assert changed == {f"{site}.act" for site in sites}
    assert all(isinstance(loaded.get_submodule(name), nn.ReLU) for name in changed)
    x = images(case)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=0)


def test_mixer_converts_the_channel_mlp_and_keeps_the_token_mixing_mlp_dense():
    dense = build("mixer")
    moe = upcycle.convert(dense, "sparse_upcycling", num_experts=2, top_k=1, progress=False)
    assert list(upcycle.record_of(moe).layers) == ["blocks.0.mlp_channels", "blocks.1.mlp_channels"]
    assert isinstance(moe.blocks[0].mlp_tokens, type(dense.blocks[0].mlp_tokens))  # patches mixed per channel


def test_batchnorm_folds_into_the_expert_weights():
    """LeViT's Linear + BatchNorm: the experts hold the folded map, so they reproduce the BN's running statistics."""
    dense = build("levit")
    mlp = dense.stages[0].blocks[0].mlp
    ffn = get_adapter("timm_levit").read_ffn(dense, upcycle.adapters.FFNSite(0, "stages.0.blocks.0.mlp"))
    u = torch.randn(2, 4, mlp.ln1.linear.in_features)
    with torch.no_grad():
        torch.testing.assert_close(ffn.forward(u), mlp(u), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ffn.w_up, mlp.ln1.linear.weight, atol=1e-3)  # the scale is in the weights
    assert ffn.activation == "hard_swish"


@pytest.mark.parametrize(
    ("arch", "kwargs", "reason"),
    [
        ("test_resnet", {}, r"timm ResNet has no FFN \(no MLP block: its layers are convolutions\)"),
        ("pvt_v2_b0", {"embed_dims": (8, 16, 24, 32), "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)},
         r"fc1 -> 3x3 depthwise conv -> act -> fc2.*no per-token expert reproduces them"),
        ("gmlp_ti16_224", {"img_size": 32}, r"spatial gating unit \(gMLP.*mixes tokens between fc1 and fc2"),
    ],
    ids=["resnet", "pvt_v2", "gmlp"],
)  # fmt: skip
def test_a_model_without_a_per_token_ffn_is_refused_with_the_reason(arch, kwargs, reason):
    model = load_timm(arch, None, False, {"num_classes": 5, **kwargs})
    with pytest.raises(UserError, match=reason):
        upcycle.convert(model, "sparse_upcycling", num_experts=2, top_k=1, progress=False)


def test_mlps_that_mix_positions_or_carry_batchnorm_are_not_read_as_plain_mlps():
    pvt = load_timm("pvt_v2_b0", None, False, {"embed_dims": (8, 16, 24, 32), "depths": (1, 1, 1, 1),
                                              "num_heads": (1, 1, 1, 1)})  # fmt: skip
    gmlp = load_timm("gmlp_ti16_224", None, False, {"img_size": 32})
    assert mlp_kind(pvt.stages[0].blocks[0].mlp) is None  # the depthwise conv between fc1 and fc2
    assert mlp_kind(gmlp.blocks[0].mlp_channels) is None  # the spatial gating unit
    assert mlp_kind(build("efficientformer").stages[0].blocks[0].mlp) is None  # BatchNorms: its adapter folds them
    assert mlp_kind(build("swin").layers[0].blocks[0].mlp) == "mlp"


def test_an_ffn_tensor_without_a_mapping_stops_the_conversion_naming_it():
    dense = build("swin")
    dense.layers[1].blocks[0].mlp.register_parameter("gain", nn.Parameter(torch.ones(4)))
    with pytest.raises(UserError, match=r"blocks\.0\.mlp \(Mlp\) holds .*: layers\.1\.blocks\.0\.mlp\.gain;"):
        upcycle.convert(dense, "sparse_upcycling", num_experts=2, top_k=1, progress=False)


def test_timm_export_refuses_a_model_that_lost_source_tensors_outside_its_ffns(tmp_path, monkeypatch):
    """A model whose whole block was replaced by its MoE, rebuilt by an install that does the same, passes the rebuild
    check; the comparison with the dense source names what went missing, and nothing is written."""
    moe = upcycle.convert(build("swin"), "sparse_upcycling", num_experts=2, top_k=1, layers=[0], progress=False)
    set_submodule(moe, "layers.0.blocks.0", moe.get_submodule("layers.0.blocks.0.mlp"))
    adapter = get_adapter("timm_swin")
    monkeypatch.setattr(type(adapter), "install", lambda self, model, site, moe: set_submodule(
        model, site.name.rpartition(".")[0], MoEFFN(moe)))  # fmt: skip
    with pytest.raises(UserError, match=r"lacks \d+ tensor\(s\) of its dense source .*layers\.0\.blocks\.0\.norm1"):
        upcycle.export(moe, tmp_path / "timm", format="timm")
    assert not (tmp_path / "timm").exists()
    monkeypatch.undo()
    moe = upcycle.convert(build("swin"), "sparse_upcycling", num_experts=2, top_k=1, layers=[0], progress=False)
    moe.layers[1].blocks[0].attn.proj = nn.Identity()  # a tensor removed outside any FFN
    with pytest.raises(UserError, match=r"lacks 2 tensor\(s\) .*: layers\.1\.blocks\.0\.attn\.proj\.weight, "
                                        r"layers\.1\.blocks\.0\.attn\.proj\.bias;"):  # fmt: skip
        upcycle.export(moe, tmp_path / "timm", format="timm")


def test_adapters_are_found_for_their_families_only():
    assert find_adapter(build("hiera")).name == "timm_hiera"  # its blocks[i].mlp would fit the ViT adapter too
    assert find_adapter(build("xcit")).name == "timm_xcit"
    assert adapter_of(build("levit_conv")).name == "timm_levit"


@pytest.mark.parametrize("case", ["xcit", "hiera"])
def test_a_model_built_by_timm_directly_converts_and_verifies(case):
    """No record of its creation arguments: the adapter reads what it needs off the model (both crashed there)."""
    import timm

    arch, kwargs, *_ = CASES[case]
    dense = timm.create_model(arch, pretrained=False, num_classes=5, **kwargs).eval()
    result = upcycle.verify(upcycle.convert(dense, "sparse_upcycling", num_experts=2, top_k=1, progress=False), dense)
    assert result.passed(), result.summary()


def test_swin_layer_decay_counts_blocks_across_stages():
    """Swin's blocks are ``layers.s.blocks.j``: block j of stage s sits at 1 + (blocks before stage s) + j, a
    stage's patch merging at the depth of the block before it (SimMIM's Swin fine-tuning, arXiv 2111.09886)."""
    depths, count = layer_ids(build("swin"))  # stages of 1 and 2 blocks
    assert count == 3
    assert depths["patch_embed.proj.weight"] == 0
    assert depths["layers.0.blocks.0.mlp.fc1.weight"] == 1
    assert depths["layers.1.downsample.reduction.weight"] == 1
    assert depths["layers.1.blocks.0.attn.qkv.weight"] == 2
    assert depths["layers.1.blocks.1.mlp.fc2.bias"] == 3
    assert depths["norm.weight"] == depths["head.fc.weight"] == 4
