"""The MoE Jetpack benchmark runs end to end in quick mode with its own (cached) pre-training and writes every
summary key of the issue, the curves and the ablation plot."""

import json

import pytest

from upcycle.methods.jetpack import bench as jetpack


def test_epochs_to_reach():
    assert jetpack.epochs_to_reach([0.2, 0.5, 0.7, 0.7], 0.7) == 3
    assert jetpack.epochs_to_reach([0.2, 0.5], 0.7) is None


@pytest.mark.slow
def test_bench_jetpack_quick(tmp_path, monkeypatch):
    from upcycle.data.paths import data_root

    monkeypatch.setenv("UPCYCLE_DATA", str(data_root()))  # the datasets stay where make data put them
    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path / "cache"))  # pre-training is cached afresh
    result = jetpack.run(out=tmp_path, quick=True, progress=False)
    payload = json.loads((tmp_path / "jetpack.json").read_text())
    summary = payload["summary"]
    assert result["summary"] == summary
    for data in ("mnist5k", "digits"):
        for column in jetpack.COLUMNS:
            assert 0.0 <= summary[f"{data}.{column}"] <= 1.0
    assert "convergence_speedup" in summary and summary["pretrain_seconds"] > 0
    rows = payload["rows"]
    main = [r for r in rows if r["kind"] == "main"]
    assert len(main) == 2 * len(jetpack.COLUMNS)
    assert all(len(r["val_curve"]) == 2 and r["macs_per_image"] > 0 for r in main)
    moe = next(r for r in main if r["column"] == "jetpack")
    dense = next(r for r in main if r["column"] == "dense_pretrained")
    assert moe["parameters"] > dense["parameters"]  # the experts add parameters, not proportional compute
    assert {r["variant"] for r in rows if r["kind"] == "ablation"} >= {"strategy=copy (sparse upcycling)"}
    for name in ("jetpack_curves.png", "jetpack_ablation.png"):
        assert (tmp_path / name).stat().st_size > 10_000
