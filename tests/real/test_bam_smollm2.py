"""The real-model path of BAM / BTX: SmolLM2-135M, two short domain branches, a BTX and a BAM mixture, exported
(Mixtral; upcycle's BAM class), reloaded through transformers' Auto classes, same logits, same greedy text."""

import pytest
import torch
import transformers

import upcycle
from upcycle.assets import smollm2_dir
from upcycle.methods.bam import load_recipe, run_stages
from upcycle.recipes import list_recipes
from upcycle.sources import load_source

pytestmark = pytest.mark.slow

RECIPE = list_recipes()["bam_smollm2"]
SHORT = {"batch_size": 2, "seq_len": 32, "eval_batches": 1, "log_every": 1}


def test_smollm2_branches_mix_export_reload_generate(tmp_path):
    path = smollm2_dir()
    shipped = load_recipe(RECIPE)
    recipe = load_recipe({**shipped.model_dump(), "branch": {**shipped.branch, **SHORT, "steps": 2},
                          "mix": {**shipped.mix, **SHORT, "steps": 2}})  # fmt: skip
    models = run_stages(load_source(path), recipe, tmp_path / "run", progress=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    ids = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
    exports = {"btx": ("mixtral", "MixtralForCausalLM"), "bam_expert_kv": ("bam", "UpcycleBAMForCausalLM")}
    for variant, (fmt, expected_class) in exports.items():
        model = models[variant].eval()
        directory = upcycle.export(model, tmp_path / variant, format=fmt)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
        assert type(loaded).__name__ == expected_class
        with torch.no_grad():
            assert (loaded(ids).logits - model(ids).logits).abs().max() <= 1e-4
            ours = model.generate(ids, max_new_tokens=8, do_sample=False)
            theirs = loaded.generate(ids, max_new_tokens=8, do_sample=False)
        assert torch.equal(ours, theirs)
        reloaded_tokenizer = transformers.AutoTokenizer.from_pretrained(directory)  # the tokenizer came along
        assert reloaded_tokenizer.decode(theirs[0]).startswith("def fibonacci(n):")
    bam = models["bam_expert_kv"]
    assert bam.model.layers[0].self_attn.num_experts == 3 and not bam.config.parallel_attention
