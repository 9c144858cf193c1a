"""``upcycle run RECIPE.yaml``: the run section picks the dense model, one pipeline section says what happens."""

import json

import pytest
import yaml

from upcycle.cli import main
from upcycle.run import load_run_recipe, run_recipe

from .models.helpers import tiny_lm

TRAIN = {"batch_size": 4, "seq_len": 32, "log_every": 1, "eval_batches": 1}


def write(path, recipe):
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_convert_train_export_from_one_recipe(tmp_path):
    from transformers import AutoModelForCausalLM

    import upcycle

    upcycle.save(tiny_lm(), tmp_path / "seed")
    recipe = write(tmp_path / "lm.yaml", {
        "run": {"source": str(tmp_path / "seed"), "export": "auto"},
        "convert": {"method": "sparse_upcycling", "num_experts": 2, "top_k": 2},
        "train": {**TRAIN, "data": "shakespeare", "steps": 2},
    })  # fmt: skip
    summary = run_recipe(recipe, tmp_path / "run", progress=False)
    assert summary["max_abs_diff"] < 1e-4 and summary["val"]["perplexity"] > 1
    assert (tmp_path / "run" / "converted" / "config.json").is_file()
    assert type(AutoModelForCausalLM.from_pretrained(summary["exported"])).__name__ == "MixtralForCausalLM"


def test_bam_recipe_through_the_cli(tmp_path, capsys):
    import upcycle

    upcycle.save(tiny_lm(parallel=True), tmp_path / "seed")
    recipe = write(tmp_path / "bam.yaml", {
        "run": {"source": str(tmp_path / "seed"), "export": "auto"},
        "bam": {"domains": ["shakespeare", "python_docs"], "branch": {**TRAIN, "steps": 1},
                "mix": {**TRAIN, "steps": 1}, "variants": ["btx", "bam_shared_kv"], "dense_continued": False,
                "eval_sequences": 4},
    })  # fmt: skip
    assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 0
    assert "btx_ppl" in capsys.readouterr().out
    exported = json.loads((tmp_path / "run" / "export-mix-bam_shared_kv" / "config.json").read_text())
    assert exported["model_type"] == "upcycle_bam"  # BAM -> its own class
    assert not (tmp_path / "run" / "export-mix-btx").exists()  # parallel blocks: neither Mixtral nor Qwen2-MoE


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({"convert": {}}, "no 'run' section"),
        ({"run": {"source": "x"}, "convert": {}, "bam": {}}, "exactly one of the sections"),
        ({"run": {"source": "x", "export": "onnx"}, "convert": {}}, "export"),
        ({"run": {"source": "pretrained:vit_xs"}, "convert": {}}, None),
    ],
)
def test_bad_run_sections(tmp_path, recipe, message):
    path = write(tmp_path / "r.yaml", recipe)
    if message is None:  # valid, but a pretrained:PRESET source needs run.pretrain, said when it is resolved
        run, _ = load_run_recipe(path)
        from upcycle.run import load_run_source

        with pytest.raises(ValueError, match=r"needs run\.pretrain"):
            load_run_source(run, progress=False)
        return
    with pytest.raises(ValueError, match=message):
        load_run_recipe(path)
