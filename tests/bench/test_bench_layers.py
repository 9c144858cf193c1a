"""The layer benchmark runs end to end in quick mode and reports every configuration the issue names."""

import json

import pytest

from upcycle.cli import main


@pytest.mark.slow
def test_bench_layers_quick(tmp_path, capsys):
    assert main(["bench", "layers", "--quick", "--rounds", "1", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "layers.json").read_text())
    assert {"summary", "rows", "command", "machine"} <= payload.keys()
    assert (tmp_path / "layers.png").stat().st_size > 10_000
    configs = {(row["shape"], row["layer"], row["backend"]) for row in payload["rows"]}
    for shape in ("vit", "lm"):
        assert (shape, "dense", "-") in configs
        for layer in ("top2_e8", "top8_e64"):
            assert {(shape, layer, "grouped"), (shape, layer, "eager")} <= configs
        assert any(c[0] == shape and c[1].startswith("soft_e8") for c in configs)
    summary = payload["summary"]
    for key in ("grouped_over_dense_train", "grouped_speedup_over_eager_train_e64"):
        assert summary[key] > 0
        assert isinstance(summary[f"{key}_met"], bool)
    # the FLOP matching the issue asks for: every top-k layer's expert MACs equal the dense FFN's
    rows = {(r["shape"], r["layer"]): r for r in payload["rows"]}
    for shape in ("vit", "lm"):
        dense = rows[(shape, "dense")]["macs_per_token"]
        for layer, experts in (("top2_e8", 8), ("top8_e64", 64)):
            router_macs = rows[(shape, layer)]["d"] * experts
            assert rows[(shape, layer)]["macs_per_token"] - router_macs == dense
    assert "wrote" in capsys.readouterr().out
