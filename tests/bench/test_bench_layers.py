"""The layer benchmark runs end to end in quick mode: the GEMM peak, every shape, dtype and expert count of the
issue, dense, every upcycle backend and transformers' experts side by side, each row with its ratios and share of
peak, and the goals as named targets."""

import json

import pytest

from upcycle.bench import layers as bench
from upcycle.cli import main


@pytest.mark.slow
def test_bench_layers_quick(tmp_path, capsys):
    assert main(["bench", "layers", "--quick", "--rounds", "1", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "layers.json").read_text())
    assert {"summary", "rows", "command", "machine"} <= payload.keys()
    assert (tmp_path / "layers.png").stat().st_size > 10_000
    rows = payload["rows"]
    for shape in bench.SHAPES:
        for dtype in bench.DTYPES:
            for experts in bench.EXPERTS:
                group = [r for r in rows if (r["shape"], r["dtype"], r["experts"]) == (shape, dtype, experts)]
                cases = {(r["layer"], r["backend"]) for r in group}
                assert ("dense", "-") in cases
                assert {("upcycle", b) for b in bench.UPCYCLE_BACKENDS} <= cases
                assert {("transformers", "eager"), ("transformers", "grouped_mm")} <= cases
                dense = next(r for r in group if r["layer"] == "dense")
                assert dense["over_dense"] == 1.0
                assert min(r["over_transformers_best"] for r in group if r["layer"] == "transformers") == 1.0
    for row in rows:
        assert row["ms"] > 0 and row["gflops"] > 0 and row["peak_share"] > 0
        assert row["peak_share"] == pytest.approx(row["gflops"] / row["peak_gflops"], rel=0.01, abs=1e-3)
        assert row["flops"] == 2 * 3 * row["d"] * row["h"] * row["tokens"] * (3 if row["mode"] == "train" else 1)
    summary = payload["summary"]
    assert summary["peak_gflops_fp32"] > 0 and summary["peak_gflops_bf16"] > 0
    for key in bench.TARGETS:
        assert summary[key] > 0
        assert isinstance(summary[f"{key}_met"], bool)
    assert "wrote" in capsys.readouterr().out


def test_moe_has_the_dense_ffns_active_flops_and_transformers_computes_the_same_layer():
    import torch

    for experts, top_k in bench.EXPERTS.items():
        moe = bench.build_moe(16, 64, experts, top_k)
        assert moe.experts.d_hidden * top_k == 64  # active expert width = the dense FFN's
        block = bench.build_transformers_block(moe)
        bench.check_same_outputs(moe, block, torch.randn(1, 5, 16), list(bench.HF_IMPLEMENTATIONS))  # raises if not
        with torch.no_grad():
            block.experts.down_proj.mul_(1.5)
        with pytest.raises(RuntimeError, match="disagree"):
            bench.check_same_outputs(moe, block, torch.randn(1, 5, 16), list(bench.HF_IMPLEMENTATIONS))
