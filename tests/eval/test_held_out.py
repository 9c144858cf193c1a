"""``HeldOut``: a held-out split for a model's task, an evenly strided subset of it, batches sized so a language
model's logits fit the budget, and the task's metric with the model's mode restored."""

import pytest
import torch
import transformers

import upcycle.eval.held_out as held_out
from upcycle.eval import accuracy
from upcycle.eval.held_out import BATCH, HeldOut


@pytest.fixture(scope="module")
def byte_lm():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=259, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def test_an_evenly_strided_subset_and_the_metric_in_eval_mode(vit):
    whole = HeldOut(vit, "digits", "val")
    subset = HeldOut(vit, "digits", "val", examples=10)
    n = len(whole.dataset)
    assert whole.batch_size == BATCH and len(subset.dataset) == 10
    assert subset.dataset.indices[0] == 0 and subset.dataset.indices[-1] == n - 1  # spread, not the first ten
    assert subset.dataset.indices == torch.linspace(0, n - 1, 10).round().long().tolist()
    assert len(HeldOut(vit, "digits", "val", examples=n + 5).dataset) == n  # more than there are: all of them
    vit.train()
    batches = list(subset.batches())
    assert sum(len(b["labels"]) for b in batches) == 10
    assert subset.metric(vit) == accuracy(vit, batches)
    assert vit.training  # restored
    assert len(list(whole.batches(max_batches=2))) == 2


def test_language_model_batches_fit_the_logit_budget(byte_lm, monkeypatch):
    default = HeldOut(byte_lm, "shakespeare", "val")
    assert default.dataset[0]["input_ids"].shape == (128,) and default.batch_size == BATCH
    monkeypatch.setattr(held_out, "LOGIT_BUDGET", 16 * 259 * 5)  # five sequences of 16 tokens over 259 tokens
    small = HeldOut(byte_lm, "shakespeare", "val", examples=20, seq_len=16)
    assert small.dataset[0]["input_ids"].shape == (16,) and small.batch_size == 5
    monkeypatch.setattr(held_out, "LOGIT_BUDGET", 1)
    assert HeldOut(byte_lm, "shakespeare", "val", seq_len=16).batch_size == 1  # never zero
    assert small.task.metric == "perplexity" and small.metric(byte_lm) > 1.0


def test_dataset_options_reach_the_split(byte_lm):
    mixture = HeldOut(byte_lm, "text_mixture", "val", seq_len=16, data_options={"num_sequences": 12})
    assert len(mixture.dataset) == 12
