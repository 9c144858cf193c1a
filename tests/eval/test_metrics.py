"""Accuracy, perplexity and embedding fidelity against manual computation on tiny synthetic loaders."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import upcycle
from upcycle.adapters import find_adapter
from upcycle.eval import accuracy, embedding_fidelity, perplexity
from upcycle.eval.metrics import mean_pool


class PassThroughClassifier(nn.Module):
    """Logits = the image's channels at pixel (0, 0): the test decides every prediction."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.dropout = nn.Dropout(0.9)  # would scramble logits if the metric left train mode on

    def forward(self, x):  # [B, C, H, W] -> [B, C]
        return self.dropout(self.scale * x[:, :, 0, 0])


class BigramLM(nn.Module):
    """Plain tensor-returning LM: logits at position t depend only on token t."""

    def __init__(self, vocab=11, hf_style=False):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)
        self.hf_style = hf_style

    def forward(self, input_ids):  # [B, T] -> [B, T, vocab]
        logits = self.table(input_ids)
        return SimpleNamespace(logits=logits) if self.hf_style else logits


def image_batches(sizes, classes=3):
    return [{"x": torch.randn(n, classes, 2, 2), "labels": torch.randint(0, classes, (n,))} for n in sizes]


def test_accuracy_matches_manual_and_weights_examples():
    batches = image_batches([4, 4, 2])  # a short last batch weighs 2 examples, not a third
    model = PassThroughClassifier().train()
    correct = sum(int((b["x"][:, :, 0, 0].argmax(-1) == b["labels"]).sum()) for b in batches)
    assert accuracy(model, batches) == correct / 10
    assert model.training and model.dropout.training  # mode restored
    # a custom forward is what gets scored: negated logits predict the least likely class
    wrong = sum(int((b["x"][:, :, 0, 0].argmin(-1) == b["labels"]).sum()) for b in batches)
    assert accuracy(model, batches, lambda m, inputs: -m(inputs["x"])) == wrong / 10


def test_accuracy_through_a_dataloader_and_bf16():
    data = [{"x": torch.eye(3)[i % 3].view(3, 1, 1).expand(3, 2, 2).clone(), "labels": torch.tensor(i % 3)}
            for i in range(7)]  # fmt: skip
    loader = DataLoader(data, batch_size=3)
    model = PassThroughClassifier()
    assert accuracy(model, loader) == 1.0
    assert accuracy(model, loader, bf16=True) == 1.0
    assert accuracy(model, loader, max_batches=1) == 1.0
    flipped = [{**item, "labels": (item["labels"] + 1) % 3} for item in data]
    assert accuracy(model, DataLoader(flipped, batch_size=3)) == 0.0


def test_bf16_computes_in_bfloat16_whatever_autocast_would_choose():
    """bf16 asks for bfloat16 itself, not autocast's default for the device (float16 on CUDA; here the CPU default
    is set to float16 to show it); without bf16 the model runs in float32."""
    dtypes = []
    linear = nn.Linear(3, 3)

    def forward(model, inputs):
        logits = linear(inputs["x"][:, :, 0, 0])
        dtypes.append(logits.dtype)
        return logits

    batches = image_batches([2])
    previous = torch.get_autocast_dtype("cpu")
    torch.set_autocast_dtype("cpu", torch.float16)
    try:
        accuracy(PassThroughClassifier(), batches, forward, bf16=True)
        accuracy(PassThroughClassifier(), batches, forward)
    finally:
        torch.set_autocast_dtype("cpu", previous)
    assert dtypes == [torch.bfloat16, torch.float32]


def test_a_forward_that_is_neither_an_adapter_nor_callable_is_refused_by_its_type():
    message = r"^expected an Adapter or a callable forward\(model, inputs\), got <class 'int'>$"
    with pytest.raises(TypeError, match=message):
        accuracy(PassThroughClassifier(), image_batches([2]), 42)


def manual_perplexity(model, batches):
    nll, count = 0.0, 0
    for batch in batches:
        ids = batch["input_ids"]
        logits = model.table(ids).detach().log_softmax(-1)
        for b in range(ids.shape[0]):
            for t in range(ids.shape[1] - 1):
                if batch.get("attention_mask") is None or batch["attention_mask"][b, t + 1]:
                    nll -= float(logits[b, t, ids[b, t + 1]])
                    count += 1
    return math.exp(nll / count)


@pytest.mark.parametrize("hf_style", [False, True])
def test_perplexity_matches_manual(hf_style):
    model = BigramLM(hf_style=hf_style)
    batches = [{"input_ids": torch.randint(0, 11, (2, 5))}, {"input_ids": torch.randint(0, 11, (1, 7))}]
    assert perplexity(model, batches) == pytest.approx(manual_perplexity(model, batches), rel=1e-5)


def test_perplexity_ignores_padding():
    model = BigramLM()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    batches = [{"input_ids": torch.randint(0, 11, (2, 6)), "attention_mask": mask}]
    assert perplexity(model, batches) == pytest.approx(manual_perplexity(model, batches), rel=1e-5)


def test_uniform_logits_give_the_vocabulary_size():
    model = BigramLM()
    nn.init.zeros_(model.table.weight)
    assert perplexity(model, [{"input_ids": torch.randint(0, 11, (3, 9))}]) == pytest.approx(11.0, rel=1e-6)


def test_perplexity_of_a_hf_model_equals_its_own_loss(dense_llama):
    model = dense_llama
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert perplexity(model, [{"input_ids": ids}]) == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert perplexity(model, [{"input_ids": ids}], find_adapter(model)) == pytest.approx(
        math.exp(float(loss)), rel=1e-5
    )


def test_fidelity_of_a_model_with_itself_is_one_and_a_different_model_is_not(dense_vit):
    vit = dense_vit
    loader = [{"x": torch.randn(2, 3, 32, 32)} for _ in range(2)]
    assert embedding_fidelity(vit, vit, loader) == pytest.approx(1.0, abs=1e-6)
    other = copy.deepcopy(vit)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5 * torch.randn_like(p))
    assert embedding_fidelity(other, vit, loader) < 0.99


class Negated(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **inputs):
        return SimpleNamespace(logits=-self.inner(**inputs).logits)


def test_fidelity_of_an_upcycled_lm_and_of_outputs(dense_llama):
    dense = dense_llama
    moe = upcycle.convert(dense, "sparse_upcycling", num_experts=4, top_k=2, progress=False)
    loader = [{"input_ids": torch.randint(0, 97, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}]
    assert embedding_fidelity(moe, dense, loader) == pytest.approx(1.0, abs=1e-5)  # copies: dense-equivalent
    logits = lambda model, inputs: model(**inputs).logits  # noqa: E731
    assert embedding_fidelity(Negated(dense), dense, loader, logits) == pytest.approx(-1.0, abs=1e-6)


def test_mean_pool_skips_masked_tokens():
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])  # [1, 3, 2]
    assert torch.equal(mean_pool(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[0.5, 0.5]]))
    assert torch.equal(mean_pool(hidden), hidden.mean(1))
    assert mean_pool(torch.ones(2, 4, 3, 3)).shape == (2, 4)  # channels-first grid


def test_mean_pool_averages_each_example_over_its_own_tokens():
    hidden = torch.tensor([[[2.0, 4.0], [8.0, 8.0], [9.0, 9.0]], [[1.0, 3.0], [3.0, 5.0], [5.0, 7.0]]])  # [2, 3, 2]
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])  # one token kept in the first example, all three in the second
    assert torch.equal(mean_pool(hidden, mask), torch.tensor([[2.0, 4.0], [3.0, 5.0]]))
    assert torch.equal(mean_pool(hidden, torch.tensor([[0, 0, 0], [1, 1, 1]]))[0], torch.zeros(2))  # nothing kept


def test_mean_pool_refuses_other_ranks_and_names_the_shape():
    with pytest.raises(ValueError, match=r"cannot mean-pool a representation of shape \(2, 3, 4, 5, 6\)"):
        mean_pool(torch.ones(2, 3, 4, 5, 6))


class NoFeatures(nn.Module):
    """An image model without ``forward_features``: its output is what fidelity compares."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)

    def forward(self, x):
        return self.proj(x.mean((2, 3)))


def test_representation_of_each_kind_of_model(dense_vit, dense_llama):
    from upcycle.eval.metrics import representation

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(representation(dense_vit, {"x": x}), dense_vit.forward_features(x))  # timm: features
        plain = NoFeatures()
        assert torch.equal(representation(plain, {"x": x}), plain(x))  # no forward_features: the output
        ids = torch.randint(0, 97, (2, 6))
        hidden = dense_llama.model(input_ids=ids).last_hidden_state  # HF: the last hidden state, not the logits
        assert torch.equal(representation(dense_llama, {"input_ids": ids}), hidden)
        logits = representation(dense_llama, {"input_ids": ids}, lambda m, inputs: m(**inputs).logits)
        assert logits.shape == (2, 6, 97)  # a given forward is what is compared


def test_perplexity_scores_the_given_labels():
    model = BigramLM()
    ids = torch.randint(0, 11, (2, 6))
    labels = ids.clone()
    labels[:, 1:4] = -100  # ignored positions: only the last two tokens of each row are predicted
    kept = {"input_ids": ids, "attention_mask": torch.tensor([[1] * 4 + [0] * 2, [1] * 6])}
    logits = model.table(ids).detach().log_softmax(-1)
    nll = [-float(logits[b, t - 1, ids[b, t]]) for b in range(2) for t in (4, 5) if kept["attention_mask"][b, t]]
    assert perplexity(model, [{"input_ids": ids, "labels": labels}]) == pytest.approx(
        math.exp(-sum(float(logits[b, t - 1, ids[b, t]]) for b in range(2) for t in (4, 5)) / 4), rel=1e-5
    )
    masked = perplexity(model, [{**kept, "labels": labels}])  # padding is ignored on top of the labels
    assert masked == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5) and len(nll) == 2


def test_a_model_without_parameters_is_taken_to_be_on_the_cpu():
    from upcycle.eval._common import model_device

    assert model_device(torch.nn.ReLU()) == torch.device("cpu")
    assert model_device(torch.nn.Linear(2, 2).to("meta")) == torch.device("meta")  # else where its weights are
