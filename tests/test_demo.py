"""``upcycle demo`` in quick mode: every step of the main job runs on the real checkpoints (SmolLM2, MiniLM) and
the report shows what happened, with its plots next to it."""

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
    assert lm["perplexity_before"] > 1 and lm["perplexity_after"] > 1
    assert lm["sample"].startswith("ROMEO:")
    minilm = result["minilm"]
    assert [row["point"] for row in minilm["d2dmoe"]] == [0.0, 0.5, 1.0]
    report = (tmp_path / "report.md").read_text()
    for image in ("smollm2/expert_load.png", "minilm/curves.png", "smollm2/finetune/curves.png"):
        assert f"({image})" in report and (tmp_path / image).stat().st_size > 5_000, image
    summary_table = report.split("|---|---|\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(summary_table) == 6 and all(len(re.findall(r"(?<!\\)\|", row)) == 3 for row in summary_table)
    assert json.loads((tmp_path / "demo.json").read_text())["smollm2"]["experts"] == 4
    printed = capsys.readouterr().out
    assert "held-out Shakespeare perplexity" in printed and str(tmp_path / "report.md") in printed
    assert not (tmp_path / "smollm2" / "finetune" / "checkpoints").exists()  # the demo keeps no resumable state
