"""``evaluate_model`` (``upcycle eval``) on a tiny ViT and its MoE on sklearn digits: the metric, MACs, parameters
and routing of the split asked for, written to ``eval.json`` (and the expert-load heatmap) when ``out`` is given."""

import json

import pytest
import torch

import upcycle
from upcycle.data import load_dataset
from upcycle.eval import accuracy, count_macs, count_parameters
from upcycle.eval.report import evaluate_model
from upcycle.layers import moe_layers


@pytest.fixture(scope="module")
def vit(vit):  # the eval tests' tiny grey-image ViT, in eval mode
    return vit.eval()


@pytest.fixture(scope="module")
def vit_moe(vit):
    return upcycle.convert(vit, "sparse_upcycling", num_experts=4, top_k=2, progress=False, router_init_std=1.0)


def test_dense_model_on_the_test_split_by_default(vit):
    test = load_dataset("digits", "test", image_size=8, channels=1)
    result = evaluate_model(vit, "digits", batch_size=128)
    assert result["split"] == "test" and result["data"] == "digits"
    assert result["examples"] == len(test)  # every example once, the short last batch included
    batches = [{"x": torch.stack([test[i]["x"] for i in range(s, min(s + 128, len(test)))]),
                "labels": torch.stack([test[i]["labels"] for i in range(s, min(s + 128, len(test)))])}
               for s in range(0, len(test), 128)]  # fmt: skip
    assert result["accuracy"] == accuracy(vit, batches)
    first = batches[0]["x"][:8]
    assert result["macs_per_sample"] == count_macs(vit, {"x": first}).total
    assert result["parameters"] == count_parameters(vit)
    assert "routing" not in result  # no MoE layer


def test_max_batches_bounds_the_examples_and_routing(vit_moe, tmp_path):
    result = evaluate_model(vit_moe, "digits", "val", batch_size=16, max_batches=3, out=tmp_path)
    assert result["split"] == "val" and result["examples"] == 3 * 16
    assert sorted(result["routing"]) == ["blocks.0.mlp.moe"]
    assert result["routing"]["blocks.0.mlp.moe"]["calls"] == 3  # the routing walks the same bounded batches
    assert result["routing"]["blocks.0.mlp.moe"]["tokens"] == 3 * 16 * 5  # 4 patches + the class token
    assert result["expert_load_png"] == str(tmp_path / "expert_load.png")
    assert (tmp_path / "expert_load.png").read_bytes().startswith(b"\x89PNG")
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["examples"] == 48 and written["accuracy"] == pytest.approx(result["accuracy"])
    layer = result["routing"]["blocks.0.mlp.moe"]
    assert written["routing"]["blocks.0.mlp.moe"]["load"] == pytest.approx(layer["load"])
    assert result["parameters"]["active"] < result["parameters"]["total"]  # top-2 of 4 experts


def test_training_split_is_refused(vit):
    with pytest.raises(ValueError, match="held-out split"):
        evaluate_model(vit, "digits", "train")


def test_batches_of_64_by_default(vit):
    assert evaluate_model(vit, "digits", "val", max_batches=1)["examples"] == 64


def test_routing_reads_at_most_8_batches_and_macs_the_first_8_examples(vit_moe):
    moe = upcycle.copy_model(vit_moe)
    for _, layer in moe_layers(moe):
        layer.router.capacity_factor = 0.5  # the executed pairs, hence the MACs per sample, depend on the examples
    val = load_dataset("digits", "val", image_size=8, channels=1)
    assert len(val) > 8 * 16
    result = evaluate_model(moe, "digits", "val", batch_size=16)
    assert result["examples"] == len(val)  # the metric reads the whole split
    assert result["routing"]["blocks.0.mlp.moe"]["calls"] == 8
    assert result["routing"]["blocks.0.mlp.moe"]["tokens"] == 8 * 16 * 5
    first = torch.stack([val[i]["x"] for i in range(8)])
    assert result["macs_per_sample"] == count_macs(moe, {"x": first}).total


def test_a_language_model_reads_sequences_of_128_tokens_by_default():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=259, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    lm = transformers.LlamaForCausalLM(config).eval()
    result = evaluate_model(lm, "shakespeare", "val", batch_size=2, max_batches=1)
    assert result["macs_per_sample"] == count_macs(lm, {"input_ids": torch.zeros(1, 128, dtype=torch.long)}).total


def test_the_task_given_overrides_the_familys(vit):
    from upcycle.errors import UserError

    with pytest.raises(UserError, match="causal lm models train on text datasets"):
        evaluate_model(vit, "digits", "val", task="causal-lm")  # a ViT's own task would read the digits


def test_data_options_reach_the_dataset(vit):
    assert evaluate_model(vit, "digits", "val", data_options={"max_samples": 40})["examples"] == 40
