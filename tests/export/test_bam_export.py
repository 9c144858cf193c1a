"""Export of merged mixtures: BAM -> upcycle's own Hugging Face class (AutoModelForCausalLM.from_pretrained, same
logits, same greedy continuation); BTX -> Mixtral / Qwen2-MoE through the standard writers."""

import json

import pytest
import torch

import upcycle

from ..models.helpers import tiny_lm
from .helpers import assert_no_training_noise, assert_round_trip, tiny_llama


def branches(build, count=3):
    models = []
    for seed in range(count):
        torch.manual_seed(seed)
        models.append(build())
    return models


@pytest.mark.parametrize("shared_kv", [False, True])
@pytest.mark.parametrize("parallel", [False, True])
def test_bam_round_trip_through_auto_classes(shared_kv, parallel, tmp_path):
    models = [tiny_lm(parallel=parallel, seed=s) for s in range(3)]
    bam = upcycle.merge(models, method="bam", shared_kv=shared_kv, router_init_std=0.5).eval()
    upcycle.export(bam, tmp_path / "bam", format="bam")
    assert_round_trip(bam, tmp_path / "bam", "UpcycleBAMForCausalLM")
    config = json.loads((tmp_path / "bam" / "config.json").read_text())
    assert config["model_type"] == "upcycle_bam" and config["num_attention_experts"] == 3
    assert json.loads((tmp_path / "bam" / "upcycle_export.json").read_text())["merge"]["method"] == "bam"


def test_bam_from_a_llama_seed_with_tied_embeddings(tmp_path):
    models = branches(lambda: tiny_llama(tie_word_embeddings=True))
    bam = upcycle.merge(models, method="bam", top_k=2, router_init_std=0.5).eval()
    upcycle.export(bam, tmp_path / "bam", format="bam")
    assert_round_trip(bam, tmp_path / "bam", "UpcycleBAMForCausalLM")


def test_btx_exports_to_mixtral_and_qwen2_moe(tmp_path):
    models = branches(tiny_llama)
    btx = upcycle.merge(models, method="btx", top_k=2, renormalize=True, router_init_std=0.5).eval()
    upcycle.export(btx, tmp_path / "mixtral", format="mixtral")
    assert_round_trip(btx, tmp_path / "mixtral", "MixtralForCausalLM")
    paper = upcycle.merge(models, method="btx", router_init_std=0.5).eval()  # top-1, raw probability
    upcycle.export(paper, tmp_path / "qwen", format="qwen2_moe")
    assert_round_trip(paper, tmp_path / "qwen", "Qwen2MoeForCausalLM")
    with pytest.raises(ValueError, match="renormalise"):
        upcycle.export(paper, tmp_path / "refused", format="mixtral")
    assert not (tmp_path / "refused").exists()


def test_btx_of_upcycles_own_sequential_lm_exports_to_mixtral(tmp_path):
    models = [tiny_lm(seed=s) for s in range(2)]
    btx = upcycle.merge(models, method="btx", renormalize=True, router_init_std=0.5).eval()
    upcycle.export(btx, tmp_path / "mixtral", format="mixtral")
    assert_round_trip(btx, tmp_path / "mixtral", "MixtralForCausalLM")
    assert_no_training_noise(tmp_path / "mixtral")  # our LM has no attention dropout setting: none is exported


def test_refusals(tmp_path):
    parallel = upcycle.merge([tiny_lm(parallel=True)], method="btx", renormalize=True)
    with pytest.raises(ValueError, match="parallel"):
        upcycle.export(parallel, tmp_path / "m", format="mixtral")
    with pytest.raises(ValueError, match="'hf_llama' adapter export as 'mixtral' or 'qwen2_moe'"):
        upcycle.export(parallel, tmp_path / "b", format="bam")
    bam = upcycle.merge([tiny_lm(), tiny_lm(seed=1)], method="bam")
    upcycle.layers.set_top_k(bam, 2)
    stale = r"block 0's FFN router runs top_k=2, .* but the config says num_experts_per_tok=1, .*; "
    with pytest.raises(ValueError, match=stale + "set the config to the routing you want exported$"):
        upcycle.export(bam, tmp_path / "b", format="bam")
    assert not any(tmp_path.iterdir())
