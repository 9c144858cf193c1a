"""``upcycle demo`` in quick mode: every step of the main job runs on the real checkpoints (SmolLM2, MiniLM) and
the report shows what happened, each result beside its dense control from step 0, with its plots next to it."""

import json
import re

import pytest

from upcycle.demo import run_demo

pytestmark = pytest.mark.slow


def test_quick_demo_runs_every_step_and_writes_the_report(tmp_path, capsys):
    result = run_demo(tmp_path, quick=True, progress=False)
    lm = result["smollm2"]
    assert lm["max_abs_diff"] < 1e-3  # copies with renormalised top-2: the dense model
    assert lm["mixtral_class"] == "MixtralForCausalLM" and lm["export_logit_diff"] < 1e-3
    assert lm["sample"].startswith("ROMEO:")
    # step 0 is measured for both, before any step, and the MoE starts as the dense model
    assert [p["step"] for p in lm["moe_curve"]] == [0, 2]
    assert lm["moe_curve"][0]["train_flops"] == lm["dense_curve"][0]["train_flops"] == 0
    step0 = lm["perplexity_step0"]
    assert step0["moe"] > 1 and abs(step0["moe"] / step0["dense"] - 1) < 0.02
    # the dense control trains longer, for the MoE's training FLOPs, and is read at the MoE's step count too
    assert lm["macs_per_token"]["moe"] > 1.3 * lm["macs_per_token"]["dense"]
    assert lm["dense_steps"] > lm["finetune_steps"] and [p["step"] for p in lm["dense_curve"]] == [0, 2, 3]
    moe_flops, dense_flops = lm["moe_curve"][-1]["train_flops"], lm["dense_curve"][-1]["train_flops"]
    assert abs(dense_flops / moe_flops - 1) < 0.35
    assert lm["perplexity_dense_equal_steps"] == lm["dense_curve"][1]["perplexity"]
    minilm = result["minilm"]
    assert [row["point"] for row in minilm["d2dmoe"]] == [0.0, 0.5, 1.0]
    assert minilm["control_steps"] >= 1 and 0 < minilm["control"]["test"] <= 1
    tested = [row for row in minilm["d2dmoe"] if "test" in row]  # test is read once, for the τ chosen on val
    assert tested == ([minilm["operating_point"]] if minilm["operating_point"] else [])
    report = (tmp_path / "report.md").read_text()
    for image in ("smollm2/expert_load.png", "minilm/curves.png", "smollm2/curves.png"):
        assert f"({image})" in report and (tmp_path / image).stat().st_size > 5_000, image
    summary_table = report.split("|---|---|\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(summary_table) == 8 and all(len(re.findall(r"(?<!\\)\|", row)) == 3 for row in summary_table)
    assert "dense control" in report and "equal training FLOPs" in report and "Where the MoE does not win" in report
    assert re.search(r"^\| 0 \| 0\.0 \| MoE \| [\d.]+ \|$", report, re.MULTILINE)  # step-0 points, both models
    assert re.search(r"^\| 0 \| 0\.0 \| dense control \| [\d.]+ \|$", report, re.MULTILINE)
    assert len(re.findall(r"^\| dense", report, re.MULTILINE)) == 2  # the dense model it came from and the control
    assert json.loads((tmp_path / "demo.json").read_text())["smollm2"]["experts"] == 4
    printed = capsys.readouterr().out
    assert "held-out perplexity, step 0" in printed and "where the MoE does not win" in printed
    assert str(tmp_path / "report.md") in printed
    assert not (tmp_path / "smollm2" / "finetune" / "checkpoints").exists()  # the demo keeps no resumable state
