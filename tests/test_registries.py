"""Everything chosen by name is a registry: one type, listed by ``upcycle list`` with a line and a paper link each,
offered by the CLI's choices, and nameable in a recipe."""

import argparse

import pytest
import torch

import upcycle
from upcycle.cli import LIST_CHOICES, _registries, build_parser, main
from upcycle.recycling.routers import router_arguments
from upcycle.registry import Registry, first_sentence

from .conversion.tiny_models import build


def test_a_registry_describes_its_entries_from_their_docstrings_and_refuses_twice():
    registry = Registry("widget")

    @registry.register("plain")
    def plain():
        """Plain widget (Someone et al., arXiv 2101.00001): more text. Second sentence."""

    registry.add("given", object(), "told", "https://example.org/paper")
    assert registry.entry("plain").description == "Plain widget (Someone et al., arXiv 2101.00001): more text"
    assert registry.entry("plain").paper == "https://arxiv.org/abs/2101.00001"
    assert (registry.entry("given").description, registry.entry("given").paper) == ("told", "https://example.org/paper")
    assert registry.names() == ["given", "plain"] and "plain" in registry
    with pytest.raises(ValueError, match="widget 'plain' is registered twice"):
        registry.add("plain", plain)
    with pytest.raises(ValueError, match="unknown widget 'other'; choose one of given, plain"):
        registry.get("other")
    assert first_sentence("Fashion-MNIST (Xiao et al. 2017): 28x28 images. More.") == (
        "Fashion-MNIST (Xiao et al. 2017): 28x28 images"
    )


def test_every_entry_of_every_registry_has_a_description():
    for heading, registry in _registries().values():
        assert registry.names(), heading
        for entry in registry.entries():
            assert entry.description, f"{heading}: {entry.name} has no description"


def _choices(command: str, flag: str) -> list[str]:
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    (action,) = [a for a in commands.choices[command]._actions if flag in a.option_strings or a.dest == flag]
    return list(action.choices)


def test_the_cli_offers_every_registered_entry():
    registries = {what: registry for what, (_, registry) in _registries().items()}
    assert sorted(_choices("convert", "--router")) == registries["routers"].names()
    assert sorted(_choices("convert", "--backend")) == registries["backends"].names()
    assert sorted(_choices("convert", "--method")) == registries["methods"].names()
    assert sorted(_choices("export", "--format")) == sorted(["auto", *registries["formats"].names()])
    assert set(_choices("list", "what")) == {"all", "adapters", "recipes", *registries}
    assert LIST_CHOICES[0] == "all"


def test_upcycle_list_prints_each_entry_with_its_paper(capsys):
    assert main(["list"]) == 0
    printed = capsys.readouterr().out
    for _, registry in _registries().values():
        for entry in registry.entries():
            paper = "" if entry.paper is None else f"[{entry.paper}]"
            assert any(
                line.split()[:1] == [entry.name] and entry.description[:40] in line and paper in line
                for line in printed.splitlines()
            ), entry.name


@pytest.mark.parametrize("router", upcycle.list_routers())
def test_a_recipe_can_name_any_registered_router(router, tmp_path):
    """Each router, built from the recipe's router section, converts a model that runs, saves and reloads the same;
    a router that mixes copies with weights summing to one keeps the dense model's output."""
    dense = build("vit").eval()
    moe = upcycle.convert(dense, num_experts=4, top_k=2, router_type=router, progress=False).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = moe(x)
        upcycle.save(moe, tmp_path / "moe")
        torch.testing.assert_close(upcycle.load(tmp_path / "moe")(x), y, rtol=0, atol=0)
    assert {layer.router.registry_name for _, layer in upcycle.layers.moe_layers(moe)} == {router}
    if router in ("topk", "soft_attention"):  # renormalised top-k / a softmax over all copies: the dense output
        assert upcycle.verify(moe, dense) < 1e-5


def test_router_options_reach_the_router_and_unknown_ones_name_the_accepted():
    dense = build("vit")
    moe = upcycle.convert(dense, num_experts=4, router_type="dynamic_k", router_options={"hidden": 7, "tau": 0.25},
                          progress=False)  # fmt: skip
    routers = [layer.router for _, layer in upcycle.layers.moe_layers(moe)]
    assert all(r.hidden == 7 and r.tau == 0.25 for r in routers)
    with pytest.raises(ValueError, match=r"router 'topk' takes no option tau; its options: top_k, .*unit_weights"):
        upcycle.convert(dense, router_options={"tau": 0.1}, progress=False)
    with pytest.raises(ValueError, match="unknown router 'nope'; choose one of cmoe, dynamic_k, "):
        upcycle.convert(dense, router_type="nope", progress=False)
    assert "hidden" in router_arguments("moefication")


def test_router_and_options_sections_given_whole_to_convert():
    dense = build("vit")
    router = {"type": "sigmoid", "options": {"bias_update_rate": 0.01}}
    moe = upcycle.convert(dense, num_experts=4, top_k=1, router=router, options={"granularity": 2}, progress=False)
    layers = [layer for _, layer in upcycle.layers.moe_layers(moe)]
    assert all(layer.router.bias_update_rate == 0.01 and layer.experts.num_experts == 8 for layer in layers)
    with pytest.raises(ValueError, match="router must be a mapping of its keys, got str"):
        upcycle.convert(dense, router="sigmoid", progress=False)


def test_a_run_recipe_names_any_registered_export_format():
    from upcycle.export import EXPORT_FORMATS
    from upcycle.run import RunSection

    for name in [*EXPORT_FORMATS.names(), "auto"]:
        assert RunSection(source="timm:vit_tiny_patch16_224", export=name).export == name
    with pytest.raises(ValueError, match=r"unknown export format 'onnx'; choose one of bam, .*mixtral, .*timm"):
        RunSection(source="timm:vit_tiny_patch16_224", export="onnx")


def test_the_cli_router_option_flag_reaches_the_recipe(tmp_path):
    from upcycle.cli import _recipe_overrides

    parser = build_parser()
    args = parser.parse_args(["convert", "src", "--out", str(tmp_path / "o"), "--router", "moefication",
                              "--router-option", "hidden=16", "--router-option", "top_k=1"])  # fmt: skip
    overrides = _recipe_overrides(args)
    config = upcycle.load_convert_config(None, **overrides)
    assert (config.router.type, config.router.options) == ("moefication", {"hidden": 16, "top_k": 1})
