"""The conversion benchmark runs end to end in quick mode: a streamed conversion needs less memory than its source."""

import json

import pytest

from upcycle.bench import convert


@pytest.mark.slow
def test_bench_convert_quick(tmp_path):
    result = convert.run(out=tmp_path, quick=True)
    payload = json.loads((tmp_path / "convert.json").read_text())
    assert {"summary", "rows", "command", "machine"} <= payload.keys()
    assert result["summary"] == payload["summary"]
    assert (tmp_path / "convert.png").stat().st_size > 10_000
    summary = payload["summary"]
    expected = {"peak_rss_gb", "seconds", "source_gb", "output_gb", "smollm2_seconds", "smollm2_peak_rss_gb",
                "peak_rss_target", "peak_rss_met"}  # fmt: skip
    assert expected <= summary.keys()
    assert summary["peak_rss_target"] == "<= 1.0" and isinstance(summary["peak_rss_met"], bool)
    assert summary["smollm2_seconds"] is None  # quick mode skips the real checkpoint
    (row,) = payload["rows"]
    assert row["case"] == "synthetic" and row["num_experts"] == 4 and row["top_k"] == 2
    assert row["output_checked"]  # the output loads with upcycle.load, runs, and its experts copy the dense FFN
    assert 0.03 < row["source_gb"] < row["output_gb"]
    assert row["seconds"] > 0 and row["peak_rss_gb"] >= row["baseline_rss_gb"] > 0
    # streaming: the conversion adds less memory than the checkpoint holds (in memory it would need source + output)
    assert 0 <= row["stream_rss_gb"] < row["source_gb"]
    assert not list(tmp_path.glob("*-moe")) and not list(tmp_path.glob("synthetic"))
