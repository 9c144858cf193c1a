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
    # seed, dense FLOPs, btx, bam, bam shared KV, dense mix FLOPs, dense same tokens, bam CM, bam shared KV CM
    summary = bam.summarize({0: fake_run(9, 6, 5, 4.5, 4.8, 5.5, 5.8, 4.6, 4.9),
                             1: fake_run(9, 6, 5, 4.9, 4.8, 5.5, 5.2, 5.0, 4.9)})  # fmt: skip
    assert summary["btx_ppl"] == 5 and summary["bam_expert_kv_ppl"] == pytest.approx(4.7)
    assert summary["bam_over_btx"] == pytest.approx(0.94) and summary["bam_cm_over_btx"] == pytest.approx(0.96)
    assert summary["ordering_holds"] and summary["ordering_holds_every_run"] and summary["ratio_target_met"]
    assert summary["ordering_holds_same_tokens"]
    assert summary["per_run"]["1"]["bam_over_btx"] == pytest.approx(0.98)
    comparisons = summary["comparisons"]
    assert comparisons["bam_vs_btx_same_flops"]["ratio"] == pytest.approx(4.8 / 5)
    assert comparisons["btx_vs_dense_same_tokens"]["ratio"] == pytest.approx(5 / 5.5)
    assert comparisons["bam_vs_dense_same_flops"]["reference"] == "dense_continued"
    assert summary["paper_beside_ours"]["bam_over_btx"] == {"paper": pytest.approx(0.905, abs=1e-3),
                                                            "ours": summary["bam_over_btx"]}  # fmt: skip
    worse = bam.summarize({0: fake_run(9, 4, 5, 4.5, 4.8, 5.5, 4.9, 4.6, 4.9)})  # dense beats BTX: ordering broken
    assert not worse["ordering_holds"] and worse["ratio_target_met"]  # the BAM / BTX ratio alone still holds
    assert not worse["ordering_holds_same_tokens"]


def test_summary_covers_only_the_models_the_scale_trains():
    """The full scale trains no shared-KV mixture and no dense run at mix-phase compute: the summary leaves them
    out and still makes every comparison of the issue."""
    run = fake_run(9, 6, 5, 4.5, 4.8, 5.5, 5.8, 4.6, 4.9)
    for name in ("bam_shared_kv", "dense_mix_compute", "bam_shared_kv_cm"):
        del run[f"{name}_ppl"], run["models"][name]
    summary = bam.summarize({0: run})
    assert "bam_shared_kv_ppl" not in summary and set(summary["costs"]) == set(run["models"])
    assert summary["comparisons"]["bam_vs_dense_same_tokens"]["ratio"] == pytest.approx(4.5 / 5.8)
    assert summary["ordering_holds"] and summary["ordering_holds_same_tokens"]


def test_router_statistics_flag_a_collapsed_ffn_router():
    def usage(*shares):
        return {"ffn": list(shares), "ffn_load_entropy": 0.5, "ffn_token_entropy": 0.9, "ffn_top_probability": 0.3,
                "attention_token_entropy": None}  # fmt: skip

    models = {"btx": {"expert_usage": {"a": usage(0.1, 0.7, 0.1, 0.1), "b": usage(0.1, 0.8, 0.05, 0.05)}},
              "bam": {"expert_usage": {"a": usage(0.7, 0.1, 0.1, 0.1), "b": usage(0.1, 0.7, 0.1, 0.1)}},
              "seed": {}}  # fmt: skip
    stats = bam.router_statistics(models)
    assert set(stats) == {"btx", "bam"}
    assert stats["btx"]["ffn_collapsed"] and not stats["bam"]["ffn_collapsed"]  # bam: a different expert per domain
    assert stats["btx"]["ffn_largest_share"] == pytest.approx(0.75) and stats["btx"]["attention_token_entropy"] is None


def test_normalised_entropy_is_one_when_uniform_and_zero_on_one_expert():
    import torch

    from upcycle.methods.bam.evaluate import normalised_entropy

    values = normalised_entropy(torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0, 0, 0], [0.5, 0.5, 0, 0]]))
    assert values.tolist() == pytest.approx([1.0, 0.0, 0.5])


@pytest.mark.slow
def test_bench_bam_quick(tmp_path, monkeypatch):
    from upcycle.data.paths import data_root

    monkeypatch.setenv("UPCYCLE_DATA", str(data_root()))  # the datasets stay where make data put them
    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path / "cache"))  # seed pre-training and phases cached afresh
    result = bam.run(out=tmp_path, quick=True, progress=False)
    payload = json.loads((tmp_path / "bam.json").read_text())
    summary = payload["summary"]
    assert result["summary"] == summary
    for key in ("dense_continued_ppl", "btx_ppl", "bam_expert_kv_ppl", "bam_shared_kv_ppl", "bam_over_btx",
                "dense_same_tokens_ppl", "bam_expert_kv_cm_ppl", "bam_cm_over_btx"):  # fmt: skip
        assert summary[key] > 0
    assert summary["scale"] == "quick" and summary["compute_matched"]["bam_expert_kv"]["steps"] < 6
    assert set(summary["router"]) >= {"btx", "bam_expert_kv", "bam_expert_kv_cm"}
    assert summary["paper_beside_ours"]["bam_macs_over_btx"]["ours"] > 1.5
    costs = summary["costs"]
    assert costs["bam_expert_kv"]["macs_per_token"] > costs["btx"]["macs_per_token"] > 0
    assert costs["btx"]["params_total"] > costs["btx"]["params_active"]
    assert costs["btx"]["forward_ms"] > 0 and costs["bam_shared_kv"]["decode_ms_per_token"] > 0
    domains = {row["model"] for row in payload["rows"] if row["split"] == "test"}
    assert domains >= set(bam.MODELS)
    for name in ("bam.png", "bam_routing.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    usage = payload["expert_usage"]["validation"]
    assert set(usage) == {"btx", "bam_expert_kv", "bam_shared_kv", "bam_expert_kv_cm", "bam_shared_kv_cm"}
    assert usage["btx"]["python_docs"]["attention"] is None
    assert sum(usage["bam_expert_kv"]["shakespeare"]["attention"]) == pytest.approx(1.0)
