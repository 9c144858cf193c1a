"""The D2DMoE benchmark runs end to end in quick mode (its own cached pre-training, real MiniLM weights) and writes
every summary key of the issue and both plots; its comparison helpers are checked on hand-made curves, its
wall-clock helpers on tiny models (what they run, on which inputs, how often), its plots on hand-made rows."""

import json

import pytest
import torch

import upcycle
from tests.conversion.tiny_models import build
from upcycle.methods.d2dmoe import bench as d2dmoe
from upcycle.methods.d2dmoe import plots, sweep
from upcycle.methods.d2dmoe.sweep import lowest_fraction_within


def rows(*points):
    return [{"point": i, "flops_fraction": cost, "val": acc, "test": acc} for i, (cost, acc) in enumerate(points)]


def test_lowest_fraction_within_one_point():
    curve = rows((1.0, 0.90), (0.5, 0.895), (0.3, 0.885), (0.2, 0.80))
    assert lowest_fraction_within(curve, 0.90, "val")["flops_fraction"] == 0.5  # 0.885 is 1.5 points down
    assert lowest_fraction_within(curve, 0.99, "val") is None


def test_lowest_fraction_within_takes_the_cheapest_qualifying_row_of_the_named_split():
    curve = [{"point": "a", "flops_fraction": 0.6, "val": 0.95, "test": 0.70},
             {"point": "b", "flops_fraction": 0.2, "val": 0.50, "test": 0.90},
             {"point": "c", "flops_fraction": 0.4, "val": 0.89, "test": 0.80}]  # fmt: skip
    assert lowest_fraction_within(curve, 0.90, "val") is curve[2]  # exactly one point down still qualifies
    assert lowest_fraction_within(curve, 0.90, "test")["point"] == "b"  # the split named, not the first
    assert lowest_fraction_within(curve, 0.90, "val", drop=0.0)["point"] == "a"
    assert lowest_fraction_within(curve, 0.90, "val", drop=0.5)["point"] == "b"
    assert lowest_fraction_within(curve, 0.97, "val") is None
    assert lowest_fraction_within([], 0.5, "val") is None


def test_lowest_fraction_within_keeps_a_point_exactly_at_the_tolerance():
    # the bound is inclusive: a row at reference - drop - 1e-12 (the rounding slack itself) still qualifies
    edge = 0.9 - 0.01 - 1e-12
    curve = rows((0.8, 0.95), (0.4, edge), (0.1, 0.5))
    assert lowest_fraction_within(curve, 0.9, "val") is curve[1]
    assert lowest_fraction_within(rows((0.3, 0.7)), 0.7, "val", drop=0.0)["flops_fraction"] == 0.3


class FakeSplit:
    """A held-out split of batches of 4 with the given sizes; each batch's examples cost ``macs`` MACs each."""

    batch_size = 4

    def __init__(self, sizes_and_macs):
        self.data, self.asked = sizes_and_macs, []

    def batches(self, max_batches=None):
        self.asked.append(max_batches)
        return [{"x": torch.zeros(size, 3), "macs": macs} for size, macs in self.data[:max_batches]]


def test_macs_per_example_averages_over_the_batches_holding_the_first_examples(monkeypatch):
    from types import SimpleNamespace

    counted = []

    def count_macs(model, batch):
        counted.append(model)
        return SimpleNamespace(total=batch["macs"])  # per example, as count_macs reports it

    monkeypatch.setattr(sweep, "count_macs", count_macs)
    split = FakeSplit([(4, 10.0), (4, 20.0), (2, 40.0)])
    model = torch.nn.Identity()
    assert sweep.macs_per_example(model, split, 6) == 15.0  # two batches of 4 hold the first 6 examples
    assert sweep.macs_per_example(model, split, 9) == (4 * 10 + 4 * 20 + 2 * 40) / 10  # weighted by batch size
    assert sweep.macs_per_example(model, split, 1) == sweep.macs_per_example(model, split, 0) == 10.0  # one at least
    assert split.asked == [2, 3, 1, 1] and all(seen is model for seen in counted)


def test_sweep_applies_each_point_then_measures_every_split_and_the_cost(monkeypatch):
    from types import SimpleNamespace

    bars, costed = [], []

    def bar(points, **options):
        bars.append(options)
        return points

    def macs(model, held_out, examples):
        costed.append((held_out, examples))
        return 50.0 * model.k

    class Split:
        def __init__(self, base):
            self.base = base

        def metric(self, model):
            return self.base + model.k

    monkeypatch.setattr(sweep, "tqdm", bar)
    monkeypatch.setattr(sweep, "macs_per_example", macs)
    model, held_out = SimpleNamespace(k=0), {"val": Split(0.5), "test": Split(0.25)}
    rows = sweep.sweep(model, 200.0, [1, 2], lambda m, point: setattr(m, "k", point), held_out)
    assert rows == [{"point": 1, "val": 1.5, "test": 1.25, "flops_fraction": 0.25},
                    {"point": 2, "val": 2.5, "test": 2.25, "flops_fraction": 0.5}]  # fmt: skip
    assert costed == [(held_out["val"], 256)] * 2  # MACs on the first split, 256 examples by default
    assert bars == [{"desc": "sweep", "unit": "point", "leave": False}]  # a transient bar
    sweep.sweep(model, 200.0, [3], lambda m, point: setattr(m, "k", point), held_out, 8, desc="k sweep")
    assert costed[-1] == (held_out["val"], 8) and bars[-1]["desc"] == "k sweep"


# ---- wall-clock helpers on a tiny ViT ----------------------------------------------------------------------------
def image_batch(size=4, seed=0):
    """Images for build("vit") (3 x 32 x 32, 5 classes) with their labels."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 3, 32, 32, generator=generator)
    return {"x": x, "labels": torch.randint(0, 5, (size,), generator=generator)}


def record_calls(modules):
    """Hooks that keep, for every call of each module, its first input, whether grad was on and its mode."""
    seen = [[] for _ in modules]

    def keep(index, module, args):
        seen[index].append((args[0].detach().clone(), torch.is_grad_enabled(), module.training))

    handles = [m.register_forward_pre_hook(lambda mod, args, i=i: keep(i, mod, args)) for i, m in enumerate(modules)]
    return seen, handles


@pytest.fixture
def timed(monkeypatch):
    """The results time_inference returned inside the sweep module (the helpers must report their median)."""
    results = []

    def spy(*args, **kwargs):
        results.append(real(*args, **kwargs))
        return results[-1]

    real = sweep.time_inference
    monkeypatch.setattr(sweep, "time_inference", spy)
    return results


def test_ffn_modules_are_the_modules_at_the_ffn_sites_dense_or_converted():
    dense = build("vit")
    assert sweep._ffn_modules(dense) == [block.mlp for block in dense.blocks]
    moe = upcycle.convert(dense, "d2dmoe", num_experts=4, progress=False)
    modules = sweep._ffn_modules(moe)
    assert modules == [block.mlp for block in moe.blocks]  # the MoE wrappers installed there
    assert all(module is not block.mlp for module, block in zip(modules, dense.blocks, strict=True))


def test_forward_feeds_the_inputs_without_their_targets():
    vit = build("vit").eval()
    batch = image_batch()
    with torch.no_grad():
        torch.testing.assert_close(sweep._forward(vit, batch), vit(batch["x"]), rtol=0, atol=0)
    lm = build("llama").eval()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        out = sweep._forward(lm, {"input_ids": ids, "attention_mask": mask, "labels": ids})
        torch.testing.assert_close(out.logits, lm(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
    assert out.loss is None  # the labels stayed out of the model's call


@pytest.mark.parametrize("kind", ["dense", "d2dmoe"])
def test_ffn_wallclock_runs_each_ffn_alone_on_what_it_sees_inside_the_model(kind, timed):
    model = build("vit")
    if kind == "d2dmoe":
        model = upcycle.convert(model, "d2dmoe", num_experts=4, tau=0.5, progress=False)
    batch = image_batch()
    ffns = [block.mlp for block in model.blocks]
    reference, handles = record_calls(ffns)
    with torch.no_grad():
        model.eval()(batch["x"])
    for handle in handles:
        handle.remove()
    expected = [calls[0][0] for calls in reference]
    assert not torch.equal(expected[0], expected[1])  # each FFN has its own input

    seen, handles = record_calls(ffns)
    attention, attention_handles = record_calls([block.attn for block in model.blocks])
    model.train()  # the measurement runs the model as it is evaluated, whatever mode it was left in
    ms = sweep.ffn_wallclock_ms(model, batch, repeats=3)
    for handle in handles + attention_handles:
        handle.remove()

    assert ms == timed[-1]["median_ms"] > 0 and len(timed[-1]["samples_ms"]) == 3
    assert [len(calls) for calls in attention] == [1, 1]  # the whole model ran once, to capture the inputs
    for calls, want in zip(seen, expected, strict=True):
        assert len(calls) == 1 + 2 + 3  # the capture, 2 warm-up runs, 3 timed runs
        for x, grad, training in calls:
            torch.testing.assert_close(x, want, rtol=0, atol=0)
            assert not grad and not training


@pytest.mark.parametrize("kind", ["dense", "d2dmoe"])
def test_ffn_wallclock_of_a_split_ffn_times_all_of_it(kind, timed):
    """BERT splits its FFN (``intermediate``: up projection; ``output.dense``: down projection). The MoE at
    ``intermediate`` stands for both, so the dense model's FFN time must include the down projection too."""
    model = build("bert_classifier")
    if kind == "d2dmoe":
        model = upcycle.convert(model, "d2dmoe", num_experts=4, tau=0.5, progress=False)
    layers = model.bert.encoder.layer
    downs, handles = record_calls([layer.output.dense for layer in layers])
    sweep.ffn_wallclock_ms(model, {"input_ids": torch.randint(0, 50, (2, 7))}, repeats=3)
    for handle in handles:
        handle.remove()
    # the capture's forward, 2 warm-up runs and 3 timed runs reach the down projection (in the MoE model the identity
    # that stands in its place)
    assert [len(calls) for calls in downs] == [1 + 2 + 3] * len(layers)


def test_wallclock_helpers_time_seven_runs_after_two_warm_ups_by_default(timed):
    model = build("vit")
    batch = image_batch()
    ffn_calls, handles = record_calls([model.blocks[0].mlp])
    sweep.ffn_wallclock_ms(model, batch)
    handles[0].remove()
    assert len(timed[-1]["samples_ms"]) == 7 and len(ffn_calls[0]) == 1 + 2 + 7  # capture, warm-up, timed
    model_calls, handles = record_calls([model])
    sweep.model_wallclock_ms(model, batch)
    handles[0].remove()
    assert len(timed[-1]["samples_ms"]) == 7 and len(model_calls[0]) == 2 + 7


def test_model_wallclock_times_the_whole_model_on_the_batch(timed):
    model = build("vit").train()
    batch = image_batch()
    seen, handles = record_calls([model])
    ms = sweep.model_wallclock_ms(model, batch, repeats=4)
    handles[0].remove()
    assert ms == timed[-1]["median_ms"] > 0 and len(timed[-1]["samples_ms"]) == 4
    assert len(seen[0]) == 2 + 4  # 2 warm-up runs, 4 timed runs
    for x, grad, training in seen[0]:
        torch.testing.assert_close(x, batch["x"], rtol=0, atol=0)
        assert not grad and not training


def test_first_batch_is_the_first_held_out_batch():
    from upcycle.eval.held_out import HeldOut
    from upcycle.pretrain import build_dense

    model = build_dense("vit_xxs", num_classes=10, seed=0, embed_dim=32, depth=2)
    held_out = HeldOut(model, "digits", "val", examples=100)
    first, second = list(held_out.batches())[:2]
    batch = sweep.first_batch(held_out)
    assert set(batch) == set(first)
    assert all(torch.equal(batch[key], first[key]) for key in first)
    assert batch["x"].shape[0] == held_out.batch_size and not torch.equal(batch["x"][: len(second["x"])], second["x"])


def test_at_or_above_compares_along_the_cost_axis():
    better = rows((0.2, 0.7), (0.5, 0.9), (1.0, 0.9))
    assert d2dmoe.at_or_above(better, rows((0.35, 0.79), (0.9, 0.9)))  # interpolated 0.8 at 0.35
    assert not d2dmoe.at_or_above(better, rows((0.35, 0.85)))
    assert d2dmoe.at_or_above(better, rows((0.1, 0.99)))  # outside better's range: not compared


@pytest.mark.slow
def test_bench_d2dmoe_quick(tmp_path, monkeypatch):
    from upcycle.data.paths import data_root

    monkeypatch.setenv("UPCYCLE_DATA", str(data_root()))  # the datasets stay where make data put them
    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path / "cache"))  # pre-training and stages cached afresh
    result = d2dmoe.run(out=tmp_path, quick=True, progress=False)
    payload = json.loads((tmp_path / "d2dmoe.json").read_text())
    summary = payload["summary"]
    assert result["summary"] == summary
    for key in ("vit.flops_fraction_at_1pt_drop", "vit.moefication_flops_fraction_at_1pt_drop",
                "vit.ffn_wallclock_speedup_at_1pt_drop", "minilm.flops_fraction_at_1pt_drop",
                "minilm.ffn_wallclock_speedup_at_1pt_drop", "minilm.model_speedup_at_1pt_drop",
                "minilm.model_share_of_ideal_at_1pt_drop"):  # fmt: skip
        assert key in summary
    for name in ("vit", "minilm"):  # both models timed end to end at the scale's τ values
        timed = [r for r in payload["rows"] if (r["model"], r["variant"]) == (name, "d2dmoe_timing")]
        assert {r["tau"] for r in timed} >= {0.0, 0.5}, name
        assert all(r["dense_model_ms"] > 0 and r["moe_model_ms"] > 0 for r in timed), name
        for r in timed:  # the rest of the model is unchanged: its ideal lies between 1 and the FFNs'
            low, high = sorted((1.0, r["ideal_ffn_speedup"]))
            assert low - 1e-9 <= r["ideal_model_speedup"] <= high + 1e-9, (name, r)
            assert r["model_share_of_ideal"] == pytest.approx(r["model_speedup"] / r["ideal_model_speedup"])
    for key, entry in summary["paper"].items():  # the paper's headline numbers next to ours
        assert entry["ours"] == summary.get(key) and entry["paper"] == d2dmoe.PAPER[key]["paper"]
    assert summary["held_out_examples"] == {"vit": 128, "minilm": 64}  # the quick scale's
    variants = {(r["model"], r["variant"]) for r in payload["rows"]}
    assert variants >= {("vit", "d2dmoe"), ("vit", "moefication"), ("vit", "d2dmoe_attention"),
                        ("minilm", "d2dmoe"), ("minilm", "moefication"), ("vit", "d2dmoe_timing"),
                        ("minilm", "d2dmoe_timing")}  # fmt: skip
    d2d = sorted((r for r in payload["rows"] if (r["model"], r["variant"]) == ("vit", "d2dmoe")),
                 key=lambda r: r["point"])  # fmt: skip
    assert d2d[0]["flops_fraction"] > d2d[-1]["flops_fraction"]  # τ = 1 runs the fewest experts
    for name in ("d2dmoe_curves.png", "d2dmoe_wallclock.png"):
        assert (tmp_path / name).stat().st_size > 10_000


# ---- plots on hand-made rows -------------------------------------------------------------------------------------
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def figures(monkeypatch):
    """Every figure the plots save (then saved for real), to read what was drawn."""
    saved = []
    real = plots.save_figure

    def keep(fig, path):
        saved.append(fig)
        real(fig, path)

    monkeypatch.setattr(plots, "save_figure", keep)
    return saved


def assert_png_written_atomically(path):
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left behind


def lines_by_label(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_plot_curves_draws_each_variant_sorted_by_cost_and_the_dense_point(tmp_path, figures):
    panels = {
        "vit": {"dense": {"val": 0.9, "test": 0.8},
                "variants": {"d2dmoe": [{"flops_fraction": 0.7, "val": 0.88, "test": 0.78},
                                        {"flops_fraction": 0.3, "val": 0.60, "test": 0.55},
                                        {"flops_fraction": 1.1, "val": 0.90, "test": 0.80}],
                             "moefication": [{"flops_fraction": 0.5, "val": 0.7, "test": 0.65}]}},
        "minilm": {"dense": {"val": 0.6, "test": 0.5},
                   "variants": {"d2dmoe_attention": [{"flops_fraction": 0.4, "val": 0.4, "test": 0.3}]}},
    }  # fmt: skip
    path = tmp_path / "curves.png"
    path.write_bytes(b"an older plot")  # replaced whole
    assert plots.plot_curves(panels, path, split="val") == path
    assert_png_written_atomically(path)
    (fig,) = figures
    assert [ax.get_title() for ax in fig.axes] == ["vit", "minilm"]  # one panel per model, in order
    vit, minilm = fig.axes

    lines = lines_by_label(vit)
    d2d, moe = lines["D2DMoE (τ sweep)"], lines["MoEfication (k sweep)"]
    assert list(d2d.get_xdata()) == [0.3, 0.7, 1.1] and list(d2d.get_ydata()) == [0.60, 0.88, 0.90]
    assert (list(moe.get_xdata()), list(moe.get_ydata())) == ([0.5], [0.7])
    dense = lines["dense (original)"]
    assert (list(dense.get_xdata()), list(dense.get_ydata())) == ([1.0], [0.9])
    assert list(lines["dense − 1 point"].get_ydata()) == pytest.approx([0.89, 0.89])  # the 1-point-drop line
    assert "D2DMoE + attention projections" not in lines  # only the variants given
    assert vit.get_ylabel() == "val accuracy" and vit.get_xlabel() == "MACs per example / dense model's"
    assert vit.get_xlim()[0] == 0
    legend = {text.get_text() for text in vit.get_legend().get_texts()}
    assert {"D2DMoE (τ sweep)", "MoEfication (k sweep)", "dense (original)", "dense − 1 point"} <= legend

    other = lines_by_label(minilm)
    assert set(other) >= {"D2DMoE + attention projections", "dense (original)"}
    assert "D2DMoE (τ sweep)" not in other
    assert list(other["dense (original)"].get_ydata()) == [0.6]


def test_plot_curves_reads_the_split_it_is_given(tmp_path, figures):
    panel = {"dense": {"val": 0.9, "test": 0.8}, "variants": {"d2dmoe": [{"flops_fraction": 0.5, "val": 0.7,
                                                                           "test": 0.6}]}}  # fmt: skip
    plots.plot_curves({"only": panel}, tmp_path / "c.png")  # test by default
    (ax,) = figures[0].axes
    lines = lines_by_label(ax)
    assert list(lines["D2DMoE (τ sweep)"].get_ydata()) == [0.6] and list(lines["dense (original)"].get_ydata()) == [0.8]
    assert ax.get_ylabel() == "test accuracy"


def _timing_row(tau, ideal_ffn, ffn, model, ideal_model):
    return {
        "tau": tau,
        "ideal_ffn_speedup": ideal_ffn,
        "ffn_speedup": ffn,
        "model_speedup": model,
        "ideal_model_speedup": ideal_model,
    }


def test_plot_timing_draws_measured_and_ideal_speedups_against_tau(tmp_path, figures):
    rows = [
        _timing_row(0.0, ideal_ffn=0.9, ffn=0.8, model=0.95, ideal_model=0.95),
        _timing_row(0.5, ideal_ffn=2.0, ffn=1.5, model=1.2, ideal_model=1.6),
        _timing_row(1.0, ideal_ffn=4.0, ffn=2.5, model=1.4, ideal_model=2.2),
    ]
    path = tmp_path / "wallclock.png"
    assert plots.plot_timing({"ViT": rows}, path) is None
    assert_png_written_atomically(path)
    (ax,) = figures[0].axes
    lines = lines_by_label(ax)
    expected = {
        "ideal (dense FFN MACs / MoE FFN MACs)": [0.9, 2.0, 4.0],
        "measured FFN layers (CPU, one test batch)": [0.8, 1.5, 2.5],
        "measured whole model": [0.95, 1.2, 1.4],
        "ideal whole model (MAC ratio)": [0.95, 1.6, 2.2],
    }
    for label, speedups in expected.items():
        assert list(lines[label].get_xdata()) == [0.0, 0.5, 1.0], label
        assert list(lines[label].get_ydata()) == speedups, label
    assert any(list(line.get_ydata()) == [1.0, 1.0] for line in ax.get_lines())  # the break-even line
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("τ (larger runs fewer experts)", "speed-up over dense")
    assert ax.get_title() == "ViT D2DMoE wall-clock"
    assert {text.get_text() for text in ax.get_legend().get_texts()} == set(expected)


def line_style(line):
    return line.get_marker(), line.get_linestyle(), line.get_markersize()


def assert_grid_and_small_legend(ax):
    gridlines = ax.xaxis.get_gridlines() + ax.yaxis.get_gridlines()
    assert gridlines and all(line.get_visible() and line.get_alpha() == 0.3 for line in gridlines)  # a faint grid
    assert {text.get_fontsize() for text in ax.get_legend().get_texts()} == {8}


def test_plot_curves_styles_each_variant_the_dense_star_and_the_drop_line(tmp_path, figures):
    from matplotlib.colors import same_color
    from matplotlib.legend import Legend

    point = {"flops_fraction": 0.5, "val": 0.7, "test": 0.6}
    panels = {"vit": {"dense": {"val": 0.9, "test": 0.8}, "variants": {"d2dmoe": [point], "moefication": [point]}},
              "minilm": {"dense": {"val": 0.6, "test": 0.5}, "variants": {"d2dmoe_attention": [point]}}}  # fmt: skip
    plots.plot_curves(panels, tmp_path / "c.png")
    (fig,) = figures
    assert tuple(fig.get_size_inches()) == pytest.approx((2 * 5.8, 4.4))  # 5.8 inches of width per panel
    vit, minilm = fig.axes
    # the sweeps: markers on lines (MoEfication dashed), small markers; each method keeps its style across panels
    assert line_style(lines_by_label(vit)["D2DMoE (τ sweep)"]) == ("o", "-", 4)
    assert line_style(lines_by_label(vit)["MoEfication (k sweep)"]) == ("^", "--", 4)
    assert line_style(lines_by_label(minilm)["D2DMoE + attention projections"]) == ("s", "-", 4)
    for ax in (vit, minilm):
        lines = lines_by_label(ax)
        dense, drop = lines["dense (original)"], lines["dense − 1 point"]
        assert line_style(dense) == ("*", "None", 12) and same_color(dense.get_color(), "black")  # a big star alone
        assert (drop.get_linestyle(), drop.get_linewidth()) == (":", 0.8) and same_color(drop.get_color(), "grey")
        assert_grid_and_small_legend(ax)
        assert ax.get_legend()._loc == Legend.codes["lower right"]  # below the curves, which rise to the right


def test_plot_timing_styles_ideal_measured_and_break_even_lines(tmp_path, figures):
    from matplotlib.colors import same_color

    rows = [
        _timing_row(0.0, ideal_ffn=0.9, ffn=0.8, model=0.95, ideal_model=1.0),
        _timing_row(1.0, ideal_ffn=4.0, ffn=2.5, model=1.4, ideal_model=2.2),
    ]
    plots.plot_timing({"ViT": rows, "MiniLM": rows}, tmp_path / "wallclock.png")
    (fig,) = figures
    assert tuple(fig.get_size_inches()) == pytest.approx((2 * 5.8, 4.2))  # one panel per model
    ax, minilm = fig.axes
    assert (ax.get_title(), minilm.get_title()) == ("ViT D2DMoE wall-clock", "MiniLM D2DMoE wall-clock")
    lines = lines_by_label(ax)
    ideal = lines["ideal (dense FFN MACs / MoE FFN MACs)"]
    assert (ideal.get_marker(), ideal.get_linestyle()) == ("None", "--") and same_color(ideal.get_color(), "black")
    whole = lines["ideal whole model (MAC ratio)"]
    assert (whole.get_linestyle(), whole.get_linewidth()) == ("-.", 0.8) and same_color(whole.get_color(), "black")
    measured = lines["measured FFN layers (CPU, one test batch)"], lines["measured whole model"]
    assert [(line.get_marker(), line.get_linestyle()) for line in measured] == [("o", "-"), ("s", ":")]
    (even,) = [line for line in ax.get_lines() if list(line.get_ydata()) == [1.0, 1.0]]
    assert (even.get_linestyle(), even.get_linewidth()) == ("-", 0.8) and same_color(even.get_color(), "grey")
    assert_grid_and_small_legend(ax)
