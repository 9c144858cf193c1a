"""D2DMoE attention projections (arXiv 2310.04361 §3.4): Q/K/V/O become equal-cost ReLU MLPs, distillation makes
them reproduce the projections, the adapter lists them as FFN sites in forward order, the neuron split with all
experts reproduces the MLP-projection model, and such models save and load before and after conversion."""

import copy
import re

import pytest
import torch

import upcycle
from tests.conversion.tiny_models import build
from upcycle.adapters import find_adapter
from upcycle.adapters.timm_vit_projections import projection_hidden, replace_attention_projections
from upcycle.eval import count_macs
from upcycle.layers import moe_layers
from upcycle.methods import d2dmoe
from upcycle.methods.d2dmoe import distill_attention_projections
from upcycle.record import record_of


def mlp_projections(hidden_ratio: float = 0.5) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(dense tiny ViT, a copy whose projections are MLPs)."""
    dense = build("vit")
    return dense, replace_attention_projections(copy.deepcopy(dense), hidden_ratio, torch.Generator().manual_seed(1))


def site_names(model: torch.nn.Module) -> list[str]:
    sites = find_adapter(model).ffn_sites(model)
    assert [site.index for site in sites] == list(range(len(sites)))
    return [site.name for site in sites]


def test_unmodified_vit_keeps_its_sites():
    assert site_names(build("vit")) == ["blocks.0.mlp", "blocks.1.mlp"]


def test_projection_mlps_are_sites_in_forward_order():
    _, model = mlp_projections()
    per_block = ["attn.qkv.q", "attn.qkv.k", "attn.qkv.v", "attn.proj", "mlp"]
    assert site_names(model) == [f"blocks.{i}.{part}" for i in range(2) for part in per_block]
    assert projection_hidden(model) == 24  # d = 48: h = d/2


def test_replacement_costs_what_the_projections_cost():
    dense, model = mlp_projections()
    inputs = find_adapter(dense).example_inputs(dense)
    assert count_macs(model, inputs).total == count_macs(dense, inputs).total
    _, narrow = mlp_projections(hidden_ratio=0.25)
    saved = 2 * 4 * 17 * (48 * 48 - 2 * 48 * 12)  # blocks × projections × tokens (16 patches + cls) × (d² - 2·d·h)
    assert count_macs(narrow, inputs).total == count_macs(dense, inputs).total - saved


def test_distillation_lowers_every_module_error():
    dense, model = mlp_projections()
    untouched = {k: v.clone() for k, v in model.state_dict().items() if ".attn.qkv." not in k and "attn.proj" not in k}
    report = distill_attention_projections(model, dense, "digits", steps=40, batch_size=16, lr=3e-3, progress=False)
    assert list(report) == [name for name in site_names(model) if ".attn." in name]
    for name, errors in report.items():
        assert errors["after"] < 0.25 * errors["before"], (name, errors)
        assert 0.0 <= errors["zeros"] <= 1.0
    assert all(torch.equal(untouched[k], v) for k, v in model.state_dict().items() if k in untouched)


@torch.no_grad()
def exact_mlp(mlp: torch.nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """A ReLU MLP of width 2·o that computes the Linear (weight [o, i], bias [o]): relu(z) - relu(-z) = z."""
    o = weight.shape[0]
    mlp.fc1.weight.copy_(torch.cat([weight, -weight]))
    mlp.fc1.bias.copy_(torch.cat([bias, -bias]))
    mlp.fc2.weight.copy_(torch.cat([torch.eye(o), -torch.eye(o)], dim=1))
    mlp.fc2.bias.zero_()


def test_each_mlp_is_distilled_towards_its_own_projection():
    """Q, K, V are the first, second and last third of timm's fused qkv output: MLPs that compute exactly Q, K, V
    and O have zero distillation error, so a target taken from the wrong third (Q and V swapped) shows."""
    dense = build("vit")
    model = replace_attention_projections(copy.deepcopy(dense), hidden=2 * 48)
    for block, teacher in zip(model.blocks, dense.blocks, strict=True):
        w, b = teacher.attn.qkv.weight.chunk(3), teacher.attn.qkv.bias.chunk(3)
        for i, part in enumerate("qkv"):
            exact_mlp(getattr(block.attn.qkv, part), w[i], b[i])
        exact_mlp(block.attn.proj, teacher.attn.proj.weight, teacher.attn.proj.bias)
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(model(x), dense(x), atol=1e-4, rtol=1e-4)
    report = distill_attention_projections(model, dense, "digits", steps=0, batch_size=4, progress=False)
    assert len(report) == 8
    for name, errors in report.items():
        assert errors["before"] < 1e-8 and errors["after"] == errors["before"], (name, errors)


def test_neuron_split_with_all_experts_equals_the_mlp_projection_model():
    _, model = mlp_projections()
    moe = upcycle.convert(model, "neuron_split", num_experts=4, top_k=4, layers="all", progress=False)
    assert len(moe_layers(moe)) == 10
    check = upcycle.verify(moe, model)
    assert check.passed(atol=1e-4, rtol=1e-4), check


@pytest.mark.parametrize("converted", [False, True])
def test_save_load_round_trip(converted, tmp_path):
    _, model = mlp_projections()
    inputs = find_adapter(model).example_inputs(model, generator=torch.Generator().manual_seed(3))
    if converted:
        model = upcycle.convert(model, "neuron_split", num_experts=4, top_k=2, layers="all", progress=False)
    upcycle.save(model, tmp_path / "out")
    loaded = upcycle.load(tmp_path / "out")
    assert record_of(loaded).source["attention_projection_hidden"] == 24
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs["x"]), model.eval()(inputs["x"]), rtol=0, atol=0)


def test_a_model_saved_before_the_replacement_saves_again(tmp_path):
    upcycle.save(build("vit"), tmp_path / "dense")
    model = replace_attention_projections(upcycle.load(tmp_path / "dense"))
    upcycle.save(model, tmp_path / "mlp")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(upcycle.load(tmp_path / "mlp")(x), model.eval()(x), rtol=0, atol=0)


def test_refuses_twice_and_non_vit_attention():
    _, model = mlp_projections()
    with pytest.raises(ValueError, match="already MLPs"):
        replace_attention_projections(model)
    with pytest.raises(ValueError, match="timm's Attention"):
        replace_attention_projections(build("eva02_swiglu_packed"))


def test_the_method_asks_the_adapter_which_families_have_replaceable_projections():
    dense = build("vit")
    model = d2dmoe.replace_attention_projections(copy.deepcopy(dense), 0.5, torch.Generator().manual_seed(1))
    assert projection_hidden(model) == 24  # the ViT adapter did it
    with pytest.raises(ValueError, match="replacing attention projections by MLPs is not supported"):
        d2dmoe.replace_attention_projections(build("llama"))
    with pytest.raises(ValueError, match="no attention projections replaced by MLPs"):
        distill_attention_projections(build("llama"), build("llama"), "digits", steps=0)


class RecordingBar:
    """Stands in for tqdm in the distillation: keeps its arguments and postfixes, runs at most ``limit`` steps."""

    def __init__(self, iterable, limit: int | None, **kwargs):
        self.iterable, self.limit, self.kwargs, self.postfixes = iterable, limit, kwargs, []

    def __iter__(self):
        return iter(list(self.iterable)[: self.limit])

    def set_postfix(self, **kwargs):
        self.postfixes.append(kwargs)


def recording_bars(monkeypatch, limit: int | None = None) -> list[RecordingBar]:
    """The bars the distillation makes from now on (each running at most ``limit`` steps)."""
    from upcycle.methods.d2dmoe import distill

    bars = []

    def make(iterable, **kwargs):
        bars.append(RecordingBar(iterable, limit, **kwargs))
        return bars[-1]

    monkeypatch.setattr(distill, "tqdm", make)
    return bars


def exact_projections(scale: float = 1.0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(dense tiny ViT, a copy whose projection MLPs compute ``scale`` times the projections they replace)."""
    dense = build("vit")
    model = replace_attention_projections(copy.deepcopy(dense), hidden=2 * 48)
    for block, teacher in zip(model.blocks, dense.blocks, strict=True):
        w, b = teacher.attn.qkv.weight.chunk(3), teacher.attn.qkv.bias.chunk(3)
        mlps = [*(getattr(block.attn.qkv, part) for part in "qkv"), block.attn.proj]
        for mlp, weight, bias in zip(mlps, [*w, teacher.attn.proj.weight], [*b, teacher.attn.proj.bias], strict=True):
            exact_mlp(mlp, weight, bias)
            with torch.no_grad():
                mlp.fc2.weight.mul_(scale)
    return dense, model


def test_distillation_shows_the_mean_loss_per_mlp_on_a_bar_of_steps(monkeypatch):
    """MLPs that output twice their projection have MSE / mean(target²) = 1 each: the bar shows the mean over the
    8 MLPs, 1, not their sum. The bar counts the steps, named, shown by default."""
    bars = recording_bars(monkeypatch, limit=1)
    dense, model = exact_projections(scale=2.0)
    distill_attention_projections(model, dense, "digits", steps=3, batch_size=4, sparsity=0.0)
    (bar,) = bars
    assert list(bar.iterable) == [0, 1, 2]
    assert bar.kwargs == {"desc": "distill attention projections", "unit": "step", "disable": False}
    assert bar.postfixes == [{"loss": "1.0000"}]


def test_distillation_defaults_to_500_steps_of_32_images(monkeypatch):
    """Without steps the bar runs over 500 steps; without batch_size the errors are measured on the first 32
    validation images, as with batch_size=32 (31 or 33 images give other errors)."""
    bars = recording_bars(monkeypatch, limit=0)
    dense, model = mlp_projections()
    report = distill_attention_projections(model, dense, "digits", progress=False)
    assert bars[0].iterable == range(500) and bars[0].kwargs["disable"] is True
    for batch_size in (31, 32, 33):
        explicit = distill_attention_projections(model, dense, "digits", batch_size=batch_size, progress=False)
        assert (explicit == report) == (batch_size == 32), batch_size


def test_distillation_refuses_bad_settings_in_full():
    dense, model = mlp_projections()
    for steps, batch_size, lr, sparsity in [
        (-1, 1, 0.001, 0.0),
        (0, 0, 0.001, 0.0),
        (0, 1, 0.0, 0.0),
        (0, 1, 0.001, -0.5),
    ]:
        settings = f"{steps}, {batch_size}, {lr}, {sparsity}"
        message = f"need steps >= 0, batch_size >= 1, lr > 0, sparsity >= 0; got {settings}"
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            distill_attention_projections(model, dense, "digits", steps, batch_size, lr, sparsity, progress=False)
    # the smallest settings are accepted: no steps, one image, no sparsity term
    report = distill_attention_projections(model, dense, "digits", 0, 1, 1e-3, 0.0, progress=False)
    assert all(errors["after"] == errors["before"] for errors in report.values())
