"""The end-to-end decode benchmark runs in quick mode (a tiny random Llama): dense, the upcycled model on every
upcycle backend and its Mixtral export on every transformers experts implementation, per dtype and expert count,
with tokens/s, ratios and the goals; in fp32 the upcycled model and its export decode the dense model's tokens."""

import json

import pytest

from upcycle.bench import decode as bench
from upcycle.bench.layers import DTYPES, HF_IMPLEMENTATIONS, UPCYCLE_BACKENDS
from upcycle.cli import main


@pytest.mark.slow
def test_bench_decode_quick(tmp_path):
    assert main(["bench", "decode", "--quick", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "decode.json").read_text())
    assert {"summary", "rows", "command", "machine", "reproduce"} <= payload.keys()
    assert (tmp_path / "decode.png").stat().st_size > 10_000
    rows = payload["rows"]
    expected = {
        ("dense", "-"),
        *(("upcycle", b) for b in UPCYCLE_BACKENDS),
        *(("mixtral", i) for i in HF_IMPLEMENTATIONS),
    }
    for dtype in DTYPES:
        for experts in bench.EXPERTS:
            group = [r for r in rows if (r["dtype"], r["experts"]) == (dtype, experts)]
            assert {(r["model"], r["backend"]) for r in group if r["onednn"]} == expected
            like_for_like = {(r["model"], r["backend"]) for r in group if not r["onednn"]}
            assert like_for_like == ({("dense", "-"), ("upcycle", "auto")} if dtype == "bf16" else set())
            assert next(r for r in group if r["model"] == "dense" and r["onednn"])["over_dense"] == 1.0
            assert max(r["over_mixtral_best"] for r in group if r["model"] == "mixtral") == 1.0
            if dtype == "fp32":  # equal to the dense model at conversion: the same greedy text
                assert all(r["same_tokens_as_dense"] for r in group), group
            entry = payload["summary"]["groups"][f"{dtype}_e{experts}"]
            over_dense = min(entry["default_over_dense"], entry.get("like_for_like_over_dense", 1.0))
            assert entry["met"] == (over_dense >= 0.9 and entry["default_over_mixtral_best"] >= 1.0)
            if dtype == "bf16":
                dense_without = next(r for r in group if r["model"] == "dense" and not r["onednn"])
                assert entry["dense_without_onednn_over_dense"] == pytest.approx(dense_without["over_dense"], abs=2e-3)
    for row in rows:
        assert row["tokens_per_s"] > 0 and len(row["round_seconds"]) == bench.QUICK["rounds"]
        assert row["tokens_per_s"] == pytest.approx(1000 / row["ms_per_token"], rel=0.01)
