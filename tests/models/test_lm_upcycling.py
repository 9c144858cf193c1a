"""UpcycleLM through upcycle's own pipeline: the hf_llama adapter finds its MLPs in both block types, sparse
upcycling keeps the function (copies + renormalised top-k), and the converted model saves, loads and generates."""

import pytest
import torch

import upcycle
from upcycle.adapters import find_adapter
from upcycle.layers import moe_layers

from .helpers import BLOCKS, tiny_lm


@pytest.mark.parametrize("block", BLOCKS)
def test_sparse_upcycling_keeps_the_function(block):
    dense = tiny_lm(BLOCKS[block])
    adapter = find_adapter(dense)
    assert adapter.name == "hf_llama"
    assert [site.name for site in adapter.ffn_sites(dense)] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    moe = upcycle.convert(dense, "sparse_upcycling", num_experts=4, top_k=2, progress=False)
    assert len(moe_layers(moe)) == dense.config.num_hidden_layers
    check = upcycle.verify(moe, dense)
    assert check.passed(atol=1e-4, rtol=1e-4), check
    prompt = torch.randint(0, 256, (2, 5))
    settings = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
    assert torch.equal(moe.generate(prompt, **settings), dense.generate(prompt, **settings))  # cache path included


@pytest.mark.parametrize("block", BLOCKS)
def test_upcycled_model_saves_and_loads(block, tmp_path):
    dense = tiny_lm(BLOCKS[block])
    moe = upcycle.convert(dense, "sparse_upcycling", num_experts=4, top_k=2, noise_std=0.05, progress=False)
    upcycle.save(moe, tmp_path / "moe")
    loaded = upcycle.load(tmp_path / "moe")
    assert type(loaded) is type(dense) and loaded.config.parallel_attention is BLOCKS[block]
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert float((loaded(ids).logits - moe.eval()(ids).logits).abs().max()) == 0.0


def test_convert_source_reads_a_save_pretrained_directory(tmp_path):
    """The CLI path: a Hugging Face directory of an UpcycleLMForCausalLM loads as that class (with its head)."""
    from upcycle.convert import convert_source
    from upcycle.sources import load_source

    tiny_lm(True).save_pretrained(tmp_path / "dense")
    assert type(load_source(str(tmp_path / "dense"))).__name__ == "UpcycleLMForCausalLM"
    result = convert_source(str(tmp_path / "dense"), tmp_path / "moe", method="sparse_upcycling", num_experts=4,
                            top_k=2)  # fmt: skip
    assert result["max_abs_diff"] <= 1e-4
    assert type(upcycle.load(tmp_path / "moe")).__name__ == "UpcycleLMForCausalLM"
