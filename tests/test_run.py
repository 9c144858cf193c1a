"""``upcycle run RECIPE.yaml``: the run section picks the dense model, one pipeline section says what happens."""

import json

import pytest
import torch
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


def tiny_vits(tmp_path, monkeypatch) -> dict:
    """A run section whose pretrained:vit_xxs / vit_xs are 2-block ViTs trained 2 steps on digits, cached here."""
    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path / "cache"))
    return {
        "model": {"vit_xxs": {"embed_dim": 32, "depth": 2}, "vit_xs": {"embed_dim": 64, "depth": 2}},
        "pretrain": {"data": "digits", "steps": 2, "batch_size": 16, "log_every": 1, "eval_batches": 1},
        "export": "auto",
    }


def assert_timm_export_reloads(model_dir, exported):
    import timm

    import upcycle

    reloaded = timm.create_model(f"local-dir:{exported}", pretrained=True).eval()
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(reloaded(x), upcycle.load(model_dir).eval()(x))


def test_d2dmoe_recipe_pretrains_its_source_and_exports(tmp_path, monkeypatch):
    recipe = write(tmp_path / "d2dmoe.yaml", {
        "run": {"source": "pretrained:vit_xxs", **tiny_vits(tmp_path, monkeypatch)},
        "d2dmoe": {"data": "digits", "num_experts": 4, "methods": ["d2dmoe", "moefication"],
                   "sparsify": {"steps": 2, "batch_size": 16}, "routers": {"steps": 2, "batch_size": 16},
                   "taus": [0.0, 1.0], "top_ks": [1, 4], "eval_examples": 32},
    })  # fmt: skip
    summary = run_recipe(recipe, tmp_path / "run", progress=False)
    assert {"d2dmoe.flops_fraction_at_1pt_drop", "moefication.flops_fraction_at_1pt_drop"} <= set(summary)
    assert sorted(summary["exported"]) == ["3-d2dmoe-routers", "3-moefication-routers"]
    assert_timm_export_reloads(tmp_path / "run" / "3-d2dmoe-routers" / "model", summary["exported"]["3-d2dmoe-routers"])


def test_jetpack_recipe_samples_experts_from_a_pretrained_predecessor(tmp_path, monkeypatch):
    recipe = write(tmp_path / "jetpack.yaml", {
        "run": {"source": "pretrained:vit_xxs", "reset_head": 10, **tiny_vits(tmp_path, monkeypatch)},
        "convert": {"method": "moe_jetpack", "layers": "last_half",
                    "options": {"predecessor": "pretrained:vit_xs", "calibration_data": "digits",
                                "calibration_images": 32}},
        "train": {"data": "digits", "steps": 2, "batch_size": 16, "log_every": 1, "eval_batches": 1},
    })  # fmt: skip
    summary = run_recipe(recipe, tmp_path / "run", progress=False)
    assert 0 <= summary["val"]["accuracy"] <= 1
    assert len(list((tmp_path / "cache" / "pretrained").iterdir())) == 2  # the model and its wider predecessor
    assert_timm_export_reloads(tmp_path / "run" / "train" / "model", summary["exported"])


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
