"""upcycle.verify compares every converted layer with its dense original on the same input, relative to the dense
output, as well as the end-to-end outputs: a broken conversion fails in every family, LayerScale ones included
(their ~1e-5 residual scale hides a zeroed expert end to end), a correct one passes, and the check is a maximum."""

import copy
import json
import pickle

import pytest
import torch

import upcycle
from upcycle.cli import main
from upcycle.layers import moe_layers
from upcycle.sources import load_timm

from ..export.helpers import tiny_llama
from .tiny_models import build

_VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3, "num_classes": 5}
LAYERSCALE = {  # timm models whose blocks scale each FFN output by a LayerScale of ~1e-5 .. 1e-6 at init
    "deit3": ("deit3_small_patch16_224", _VIT),
    "cait": ("cait_xxs24_224", {**_VIT, "depth_token_only": 1}),
    "dinov2": ("vit_small_patch14_dinov2", {**_VIT, "img_size": 28, "patch_size": 14}),
}
FAMILIES = ["vit", "deit3", "cait", "convnext_linear", "convnext_conv", "dinov2", "llama", "gpt2", "bert"]


def dense_model(family: str) -> torch.nn.Module:
    if family not in LAYERSCALE:
        return build(family)
    arch, kwargs = LAYERSCALE[family]
    torch.manual_seed(0)
    return load_timm(arch, None, False, kwargs).eval()


def upcycled(dense: torch.nn.Module) -> torch.nn.Module:
    """Four identical copies, top-2, renormalised: every token's two weights sum to 1, so the copies reproduce the
    dense FFN, and any one expert changed changes the output of the tokens routed to it."""
    return upcycle.convert(dense, "sparse_upcycling", num_experts=4, top_k=2, router_init_std=1.0, progress=False)


def busiest_expert(moe: torch.nn.Module, dense: torch.nn.Module, layer: int = 0) -> tuple[str, int]:
    """(name, expert) of the expert that most tokens of ``layer`` pick, so changing it must show."""
    upcycle.verify(moe, dense)  # runs the model once; each MoE keeps its latest routing
    name, moe_layer = moe_layers(moe)[layer]
    counts = torch.bincount(moe_layer.last_routing.indices.flatten(), minlength=moe_layer.experts.num_experts)
    return name, int(counts.argmax())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("breakage", ["zeroed", "down_x1.5"])
def test_a_broken_expert_fails_and_is_named(family, breakage):
    dense = dense_model(family)
    moe = upcycled(dense)
    correct = upcycle.verify(moe, dense)
    assert correct.passed(atol=1e-4, rtol=1e-4), correct
    assert len(correct.per_layer) == len(moe_layers(moe))
    name, expert = busiest_expert(moe, dense)
    experts = moe.get_submodule(name).experts
    with torch.no_grad():
        if breakage == "zeroed":
            for weight in (experts.w_up, experts.w_down, experts.w_gate):
                if weight is not None:
                    weight[expert].zero_()
            for bias in (experts.b_up, experts.b_down, experts.b_gate):
                if bias is not None:
                    bias[expert].zero_()
        else:
            experts.w_down[expert].mul_(1.5)
    broken = upcycle.verify(moe, dense)
    assert not broken.passed(atol=1e-4, rtol=1e-4), broken
    assert name.startswith(broken.worst_layer) and broken.worst_relative > 1e-2, broken
    if family in LAYERSCALE or family.startswith("convnext"):
        assert broken.end_to_end < 1e-4  # what the end-to-end check alone would have let through


def test_the_per_layer_check_is_a_maximum_not_a_mean():
    """One output channel of one expert 1 % off: the mean relative difference is far below 1e-4, the max is not."""
    dense = build("llama")
    moe = upcycled(dense)
    name, expert = busiest_expert(moe, dense, layer=1)
    site = name.removesuffix(".moe")
    with torch.no_grad():
        moe.get_submodule(name).experts.w_down[expert, 0].mul_(1.01)
    inputs = []
    handle = dense.get_submodule(site).register_forward_hook(lambda _, args, out: inputs.append(args[0]))
    result = upcycle.verify(moe, dense)
    handle.remove()
    with torch.no_grad():
        expected, got = dense.get_submodule(site)(inputs[0]), moe.get_submodule(site)(inputs[0])
    difference, scale = (got - expected).abs(), expected.abs().max()
    assert float(difference.mean() / scale) < 1e-4 < float(difference.max() / scale)
    assert result.per_layer[site] == pytest.approx(float(difference.max() / scale), rel=1e-5)
    assert result.worst_layer == site and not result.passed()
    assert result.per_layer["model.layers.0.mlp"] < 1e-6  # layer 0 untouched: the value is per layer


def test_the_result_is_still_the_end_to_end_float():
    dense = build("vit")
    result = upcycle.verify(upcycled(dense), dense)
    assert result == result.end_to_end and result <= 1e-4 and f"{result:.1e}" == f"{result.end_to_end:.1e}"
    assert json.loads(json.dumps({"diff": result})) == {"diff": result.end_to_end}
    for again in (copy.deepcopy(result), pickle.loads(pickle.dumps(result))):
        assert again.per_layer == result.per_layer and again.worst_layer == result.worst_layer
    assert list(result.per_layer) == ["blocks.0.mlp", "blocks.1.mlp"]  # forward order, the adapter's names
    assert "worst layer blocks." in repr(result)


@pytest.mark.parametrize("seed_kind", ["upcycle_lm", "llama"])
def test_bam_of_one_branch_compares_attention_and_ffn_experts(seed_kind):
    from ..models.helpers import tiny_lm

    torch.manual_seed(0)
    seed = tiny_lm(parallel=False) if seed_kind == "upcycle_lm" else tiny_llama()
    bam = upcycle.merge([seed], method="bam")
    result = upcycle.verify(bam, seed)
    layers = seed.config.num_hidden_layers
    assert list(result.per_layer) == [f"model.layers.{i}.{p}" for i in range(layers) for p in ("self_attn", "mlp")]
    assert result.passed(), result
    with torch.no_grad():
        bam.model.layers[1].self_attn.w_o.mul_(1.5)
    broken = upcycle.verify(bam, seed)
    assert broken.worst_layer == "model.layers.1.self_attn" and broken.worst_relative > 0.3, broken


def test_cli_names_the_worst_layer_and_exits_1(tmp_path, capsys):
    dense = dense_model("convnext_linear")
    moe = upcycled(dense)
    upcycle.save(dense, tmp_path / "dense")
    upcycle.save(moe, tmp_path / "good")
    assert main(["verify", str(tmp_path / "good"), "--against", str(tmp_path / "dense")]) == 0
    assert "within rtol 0.0001" in capsys.readouterr().out
    name, expert = busiest_expert(moe, dense, layer=2)
    with torch.no_grad():
        moe.get_submodule(name).experts.w_down[expert].zero_()
    upcycle.save(moe, tmp_path / "bad")
    assert main(["verify", str(tmp_path / "bad"), "--against", str(tmp_path / "dense")]) == 1
    out = capsys.readouterr().out
    assert "within atol" in out  # LayerScale: the logits barely move ...
    assert f"worst layer {name.removesuffix('.moe')}:" in out and "ABOVE rtol" in out  # ... the layer does
    assert main(["verify", str(tmp_path / "bad"), "--against", str(tmp_path / "dense"), "--rtol", "10"]) == 0
