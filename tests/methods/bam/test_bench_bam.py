"""The BAM benchmark runs end to end in quick mode (its own cached seed pre-training) and writes every summary key
of the issue and its plot; the summary's ordering checks are verified on hand-made runs."""

import json

import pytest

from upcycle.methods.bam import bench as bam


def fake_run(*perplexities):
    """A run_bam summary with these average test perplexities, in the order of ``bam.MODELS``."""
    values = dict(zip(bam.MODELS, perplexities, strict=True))
    return {**{f"{k}_ppl": v for k, v in values.items()},
            "models": {k: {"test": {"average": v}, "params_total": 1} for k, v in values.items()}}  # fmt: skip


def test_summary_averages_runs_and_checks_the_papers_ordering():
    summary = bam.summarize({0: fake_run(9, 6, 5, 4.5, 4.8, 5.5), 1: fake_run(9, 6, 5, 4.9, 4.8, 5.5)})
    assert summary["btx_ppl"] == 5 and summary["bam_expert_kv_ppl"] == pytest.approx(4.7)
    assert summary["bam_over_btx"] == pytest.approx(0.94)
    assert summary["ordering_holds"] and summary["ordering_holds_every_run"] and summary["ratio_target_met"]
    assert summary["per_run"]["1"]["bam_over_btx"] == pytest.approx(0.98)
    worse = bam.summarize({0: fake_run(9, 4, 5, 4.5, 4.8, 5.5)})  # dense continued beats BTX: ordering broken
    assert not worse["ordering_holds"] and worse["ratio_target_met"]  # the BAM / BTX ratio alone still holds


@pytest.mark.slow
def test_bench_bam_quick(tmp_path, monkeypatch):
    from upcycle.data.paths import data_root

    monkeypatch.setenv("UPCYCLE_DATA", str(data_root()))  # the datasets stay where make data put them
    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path / "cache"))  # seed pre-training and phases cached afresh
    result = bam.run(out=tmp_path, quick=True, progress=False)
    payload = json.loads((tmp_path / "bam.json").read_text())
    summary = payload["summary"]
    assert result["summary"] == summary
    for key in ("dense_continued_ppl", "btx_ppl", "bam_expert_kv_ppl", "bam_shared_kv_ppl", "bam_over_btx"):
        assert summary[key] > 0
    costs = summary["costs"]
    assert costs["bam_expert_kv"]["macs_per_token"] > costs["btx"]["macs_per_token"] > 0
    assert costs["btx"]["params_total"] > costs["btx"]["params_active"]
    assert costs["btx"]["forward_ms"] > 0 and costs["bam_shared_kv"]["decode_ms_per_token"] > 0
    domains = {row["model"] for row in payload["rows"] if row["split"] == "test"}
    assert domains >= set(bam.MODELS)
    for name in ("bam.png", "bam_routing.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    usage = payload["expert_usage"]["validation"]
    assert set(usage) == {"btx", "bam_expert_kv", "bam_shared_kv"}
    assert usage["btx"]["python_docs"]["attention"] is None
    assert sum(usage["bam_expert_kv"]["shakespeare"]["attention"]) == pytest.approx(1.0)
