"""Routing statistics aggregated over batches, dead experts, and the expert-load heatmap."""

import pytest
import torch
from torch import nn

import upcycle
from upcycle.eval import collect_routing_stats, plot_expert_load
from upcycle.layers import Experts, MoE, SoftMoERouter, routing_statistics

from .helpers import topk_moe


@pytest.fixture(scope="module")
def vit_moe(dense_vit):
    return upcycle.convert(dense_vit, "sparse_upcycling", num_experts=4, top_k=2, progress=False, router_init_std=1.0)


def test_stats_are_token_weighted_means_of_each_batch(vit_moe):
    batches = [{"x": torch.randn(n, 3, 32, 32), "labels": torch.zeros(n)} for n in (3, 3, 1)]
    stats = collect_routing_stats(vit_moe, batches)
    assert sorted(stats) == ["blocks.0.mlp.moe", "blocks.1.mlp.moe"]
    manual = []
    with torch.no_grad():
        for batch in batches:
            vit_moe(batch["x"])
            manual.append(routing_statistics(vit_moe.blocks[1].mlp.moe.last_routing))
    layer = stats["blocks.1.mlp.moe"]
    tokens = [m["tokens"] for m in manual]
    assert layer["tokens"] == sum(tokens) == 7 * 17 and layer["calls"] == 3
    expected = sum(torch.tensor(m["load"], dtype=torch.float64) * n for m, n in zip(manual, tokens, strict=True)) / sum(
        tokens
    )
    assert torch.allclose(torch.tensor(layer["load"], dtype=torch.float64), expected, rtol=0, atol=1e-12)  # float64
    assert layer["entropy"] == pytest.approx(
        sum(m["entropy"] * n for m, n in zip(manual, tokens, strict=True)) / sum(tokens)
    )
    assert sum(layer["load"]) == pytest.approx(1.0)
    assert layer["dead_experts"] == 0 and layer["dropped_pairs"] == 0 and layer["kind"] == "sparse"


def test_max_batches_and_mode_restored(vit_moe):
    vit_moe.train()
    batches = [{"x": torch.randn(2, 3, 32, 32)} for _ in range(4)]
    stats = collect_routing_stats(vit_moe, batches, max_batches=2)
    assert stats["blocks.0.mlp.moe"]["calls"] == 2
    assert vit_moe.training
    vit_moe.eval()


def test_dead_experts_and_drops():
    moe = topk_moe(e=4, k=2, capacity_factor=0.5)
    with torch.no_grad():  # every token prefers experts 0 and 1: 2 and 3 never run, capacity drops the rest
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[:, 0] = torch.tensor([3.0, 2.0, -1.0, -2.0])
    batches = [{"x": torch.randn(8, 16).abs() + 1} for _ in range(2)]
    layer = collect_routing_stats(moe, batches)[""]
    assert layer["dead_experts"] == 2
    assert layer["load"][2] == layer["load"][3] == 0.0
    # capacity ceil(0.5·8·2/4) = 2 per expert: first choices of tokens 0, 1 (expert 0), their second (expert 1)
    assert layer["dropped_pairs"] == 0.75 and layer["dropped_tokens"] == 0.75
    assert layer["tokens"] == 16


def test_slot_router_stats():
    moe = nn.Sequential(MoE(SoftMoERouter(16, 4, slots_per_expert=2), Experts(4, 16, 8)))
    layer = collect_routing_stats(moe, [{"x": torch.randn(2, 5, 16)}])["0"]
    assert layer["kind"] == "slots" and len(layer["load"]) == 4
    assert sum(layer["load"]) == pytest.approx(1.0)
    assert layer["max_entropy"] == pytest.approx(torch.log(torch.tensor(8.0)).item())


def test_heatmap_is_written_atomically(tmp_path):
    stats = {
        "layers.0": {"load": [0.5, 0.25, 0.25, 0.0]},
        "layers.1": {"load": [0.5, 0.5]},  # fewer experts: padded, not an error
    }
    path = plot_expert_load(stats, tmp_path / "plots" / "load.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 1000
    assert [p.name for p in path.parent.iterdir()] == ["load.png"]  # no temporary file left behind
    with pytest.raises(
        ValueError, match=r"^plot_expert_load: no routing statistics \(did the loader run any MoE layer\?\)$"
    ):
        plot_expert_load({}, tmp_path / "empty.png")


def one_call(load, kind, tokens=4):
    return {"tokens": tokens, "load": load, "entropy": 0.0, "max_entropy": 1.0, "dropped_pairs": 0.0,
            "dropped_tokens": 0.0, "kind": kind}  # fmt: skip


def test_dead_experts_by_the_rule_of_each_kind_of_routing():
    from upcycle.eval.routing_report import aggregate

    loads = [0.6, 0.37, 0.028, 0.002]  # one expert below 1% of the uniform share (0.0025), one above
    assert aggregate([one_call(loads, "sparse")])["dead_experts"] == 0  # sparse: only experts with no pair
    assert aggregate([one_call([0.7, 0.3, 0.0, 0.0], "sparse")])["dead_experts"] == 2
    assert aggregate([one_call(loads, "slots")])["dead_experts"] == 1  # slots: below 1% of a uniform share
    assert aggregate([one_call([0.6, 0.3975, 0.0, 0.0025], "slots")])["dead_experts"] == 1  # at the bound: alive


def test_a_single_token_is_its_own_average():
    from upcycle.eval.routing_report import aggregate

    layer = aggregate([{**one_call([0.0, 1.0], "sparse", tokens=1), "entropy": 0.5}])
    assert layer["load"] == [0.0, 1.0] and layer["entropy"] == 0.5 and layer["dead_experts"] == 1


def saved_figure(monkeypatch):
    from matplotlib.figure import Figure

    figures, save = [], Figure.savefig

    def spy(self, *args, **kwargs):
        figures.append((self, kwargs))
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return figures


def test_heatmap_shows_each_layers_load_on_a_scale_from_zero(tmp_path, monkeypatch):
    figures = saved_figure(monkeypatch)
    stats = {"layers.0": {"load": [0.25, 0.25, 0.25, 0.25]}, "layers.1": {"load": [0.5, 0.5]}}
    plot_expert_load(stats, tmp_path / "load.png")
    ((figure, _),) = figures
    heatmap = figure.axes[0]
    image = heatmap.images[0]
    assert image.get_clim()[0] == 0.0  # a uniform router is not drawn at the bottom of the scale
    shown = torch.tensor(image.get_array().filled(float("nan")))
    assert torch.equal(shown[0], torch.full((4,), 0.25))
    assert torch.equal(shown[1, :2], torch.tensor([0.5, 0.5])) and shown[1, 2:].isnan().all()  # padded, blank
    assert [t.get_text() for t in heatmap.get_yticklabels()] == ["layers.0", "layers.1"]
    assert list(heatmap.get_xticks()) == [0, 1, 2, 3]
    assert len(figure.axes) == 2 and image.colorbar.ax is figure.axes[1]  # the colour bar is the heatmap's scale


@pytest.mark.parametrize(
    ("title", "shown"), [({}, "Expert load"), ({"title": "MoE after training"}, "MoE after training")]
)
def test_heatmap_names_its_axes_scale_and_title(tmp_path, monkeypatch, title, shown):
    figures = saved_figure(monkeypatch)
    plot_expert_load({"layers.0": {"load": [0.25, 0.75, 0.0, 0.0]}}, tmp_path / "load.png", **title)
    ((figure, _),) = figures
    heatmap, scale = figure.axes
    assert heatmap.get_xlabel() == "expert" and heatmap.get_ylabel() == "MoE layer"
    assert scale.get_ylabel() == "share of routed tokens"
    assert heatmap.get_title() == f"{shown}\n(uniform = 1/4)"


def test_heatmap_draws_each_load_as_a_sharp_cell_in_readable_type(tmp_path, monkeypatch):
    """Cells stretched to fill the axes, drawn without smoothing in viridis; tick labels of 7 points and a title of
    10 (whatever the user's matplotlib defaults); a constrained layout at 120 dpi; 0.4 inch per expert and 0.35 per
    layer on a 5 × 2 inch base, at most 16 × 12."""
    import matplotlib
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    figures = saved_figure(monkeypatch)
    with matplotlib.rc_context({"image.cmap": "gray", "font.size": 14}):
        plot_expert_load({"layers.0": {"load": [0.5, 0.5, 0.0, 0.0]}, "layers.1": {"load": [0.25] * 4}}, tmp_path / "a")
    ((figure, saved),) = figures
    heatmap, image = figure.axes[0], figure.axes[0].images[0]
    assert heatmap.get_aspect() == "auto" and image.get_interpolation() == "nearest"
    assert image.get_cmap().name == "viridis"
    assert heatmap.title.get_fontsize() == 10 and {t.get_fontsize() for t in heatmap.get_yticklabels()} == {7}
    assert isinstance(figure.get_layout_engine(), ConstrainedLayoutEngine) and saved["dpi"] == 120
    assert tuple(figure.get_size_inches()) == pytest.approx((5 + 0.4 * 4, 2 + 0.35 * 2))
    plot_expert_load({f"layers.{i}": {"load": [1 / 40] * 40} for i in range(40)}, tmp_path / "b")
    assert tuple(figures[-1][0].get_size_inches()) == (16, 12)


@pytest.mark.parametrize(("name", "magic"), [("load.svg", b"<?xml"), ("load.pdf", b"%PDF"), ("load", b"\x89PNG"),
                                             ("load.PNG", b"\x89PNG")])  # fmt: skip
def test_heatmap_format_follows_the_suffix(tmp_path, name, magic):
    path = plot_expert_load({"layers.0": {"load": [0.5, 0.5]}}, tmp_path / name)
    assert path.read_bytes().startswith(magic)


def test_heatmap_grows_with_experts_and_layers_up_to_a_bound(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    sizes = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: sizes.append(tuple(self.get_size_inches())))

    def size(layers, experts):
        plot_expert_load({f"layers.{i}": {"load": [1 / experts] * experts} for i in range(layers)}, tmp_path / "x.png")
        return sizes[-1]

    few, more_experts, more_layers = size(2, 2), size(2, 8), size(8, 2)
    assert more_experts[0] > few[0] and more_experts[1] == few[1]
    assert more_layers[1] > few[1] and more_layers[0] == few[0]
    assert size(2, 64) == size(2, 128) and size(64, 2) == size(128, 2)  # bounded: huge models stay readable
