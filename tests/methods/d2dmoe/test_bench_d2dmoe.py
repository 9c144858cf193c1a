"""The D2DMoE benchmark runs end to end in quick mode (its own cached pre-training, real MiniLM weights) and writes
every summary key of the issue and both plots; its comparison helpers are checked on hand-made curves."""

import json

import pytest

from upcycle.methods.d2dmoe import bench as d2dmoe
from upcycle.methods.d2dmoe.sweep import lowest_fraction_within


def rows(*points):
    return [{"point": i, "flops_fraction": cost, "val": acc, "test": acc} for i, (cost, acc) in enumerate(points)]


def test_lowest_fraction_within_one_point():
    curve = rows((1.0, 0.90), (0.5, 0.895), (0.3, 0.885), (0.2, 0.80))
    assert lowest_fraction_within(curve, 0.90, "val")["flops_fraction"] == 0.5  # 0.885 is 1.5 points down
    assert lowest_fraction_within(curve, 0.99, "val") is None


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
                "vit.ffn_wallclock_speedup_at_1pt_drop", "minilm.flops_fraction_at_1pt_drop"):  # fmt: skip
        assert key in summary
    variants = {(r["model"], r["variant"]) for r in payload["rows"]}
    assert variants >= {("vit", "d2dmoe"), ("vit", "moefication"), ("vit", "d2dmoe_attention"),
                        ("minilm", "d2dmoe"), ("minilm", "moefication"), ("vit", "d2dmoe_timing")}  # fmt: skip
    d2d = sorted((r for r in payload["rows"] if (r["model"], r["variant"]) == ("vit", "d2dmoe")),
                 key=lambda r: r["point"])  # fmt: skip
    assert d2d[0]["flops_fraction"] > d2d[-1]["flops_fraction"]  # τ = 1 runs the fewest experts
    for name in ("d2dmoe_curves.png", "d2dmoe_wallclock.png"):
        assert (tmp_path / name).stat().st_size > 10_000
