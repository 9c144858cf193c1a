"""The upcycling benchmark runs end to end in quick mode (a 2-layer byte LM of width 64): every column, finite
perplexity per domain, curves from step 0, equal MACs where the columns claim equal FLOPs, load statistics, and a
rerun resumes from the progress file instead of training again."""

import json
import math

import pytest

from upcycle.bench import upcycling


@pytest.mark.slow
def test_bench_upcycling_quick(tmp_path, monkeypatch):
    from upcycle.data.paths import data_root

    monkeypatch.setenv("UPCYCLE_DATA", str(data_root()))  # the prepared datasets, with a fresh cache for the rest
    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path / "cache"))
    result = upcycling.run(out=tmp_path / "out", quick=True, progress=False)
    payload = json.loads((tmp_path / "out" / "upcycling.json").read_text())
    assert {"summary", "rows", "command", "machine", "reproduce"} <= payload.keys()
    assert result["summary"] == payload["summary"]
    assert (tmp_path / "out" / "upcycling.png").stat().st_size > 10_000
    rows = {row["column"]: row for row in payload["rows"]}
    assert list(rows) == list(upcycling.COLUMNS)
    domains = upcycling.QUICK.domains
    assert len(domains) >= 2
    steps = upcycling.QUICK.train["steps"]
    for column, row in rows.items():
        for split in ("test", "test_step0"):
            assert all(math.isfinite(row[split][d]) and row[split][d] > 1 for d in (*domains, "average")), column
        curve = row["val_curve"]
        assert [p["step"] for p in curve] == list(range(0, steps + 1, upcycling.QUICK.train["eval_every"]))
        assert all(math.isfinite(p[d]) for p in curve for d in domains)
        assert row["tokens"] == steps * upcycling.QUICK.train["batch_size"] * upcycling.QUICK.train["seq_len"]
        assert row["train_seconds"] > 0 and row["macs_per_token"] > 0
        if column == "dense_continued":
            assert row["load"] is None
            continue
        load = row["load"]
        assert 0 <= load["mean_load_entropy"] <= 1 and load["uniform_share"] <= load["max_load_share"] <= 1
        for layer in load["layers"].values():  # every converted FFN, shares summing to 1
            assert abs(sum(layer["load"]) - 1) < 1e-2 and 0 <= layer["load_entropy"] <= 1
        assert len(load["layers"]) == upcycling.QUICK.model["num_hidden_layers"]
    # training moved every column whose weights train (MoEfication trains only its routers: its experts are the FFN)
    for column in ("dense_continued", "sparse_upcycling", "drop_upcycling_r0.5"):
        assert rows[column]["test"]["average"] < rows[column]["test_step0"]["average"]
    # equal FLOPs is measured: the columns that claim it cost the dense model's MACs per token, routers aside
    dense_macs = rows["dense_continued"]["macs_per_token"]
    for column in upcycling.EQUAL_FLOPS:
        assert abs(rows[column]["macs_per_token"] / dense_macs - 1) < 0.10, column
    assert payload["summary"]["equal_flops_macs_spread"] < 0.10
    for column in ("cmoe", "moefication"):  # a quarter of each FFN active, in MACs and in parameters
        assert rows[column]["macs_per_token"] < 0.9 * dense_macs, column
        assert rows[column]["params_active"] < 0.9 * rows["dense_continued"]["params_active"], column
    # the exact-start conversions begin where the dense model begins
    for column in ("sparse_upcycling", "sparse_upcycling_top1", "shared_finegrained"):
        assert rows[column]["test_step0"]["average"] == pytest.approx(rows["dense_continued"]["test_step0"]["average"],
                                                                      rel=1e-3)  # fmt: skip
    summary = payload["summary"]
    assert set(upcycling.COLUMNS) <= summary.keys() and "paper" in summary and "cmoe_step0_over_dense" in summary

    # a second run finds every column in the progress file: nothing is converted or trained again
    monkeypatch.setattr(upcycling, "run_column", lambda *args: pytest.fail("a finished column ran again"))
    again = upcycling.run(out=tmp_path / "again", quick=True, progress=False)
    assert again["summary"]["equal_flops_ranking"] == summary["equal_flops_ranking"]


class _Trained(Exception):
    pass


@pytest.mark.parametrize("column", ["dense_continued", "sparse_upcycling"])
def test_every_column_trains_with_its_dense_models_record(tmp_path, monkeypatch, column):
    """The model each column trains keeps where the dense model came from: a checkpoint's tokenizer is found through
    it (SmolLM2's 49152-token vocabulary is not the byte one), for the dense column as for the converted ones."""
    import torch

    from upcycle.pretrain import build_dense
    from upcycle.record import ConversionRecord, attach_record, record_of

    dense = build_dense("lm_tiny", seed=0, **upcycling.TINY_LM).eval()
    attach_record(dense, ConversionRecord(origin="a-checkpoint", files=str(tmp_path)))
    seen = []

    def fake_train(model, *args, **kwargs):
        seen.append(record_of(model))
        raise _Trained

    monkeypatch.setattr("upcycle.train.train", fake_train)
    held_out = {"val": type("Ids", (), {"example_ids": lambda self, n: torch.zeros(n, 8, dtype=torch.long)})()}
    with pytest.raises(_Trained):
        upcycling.run_column(column, dense, upcycling.QUICK, held_out, tmp_path / "work")
    assert seen[0] is not None and seen[0].files == str(tmp_path)
