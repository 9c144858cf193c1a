"""Sequence classification (an encoder with a head, on the domains of ``text_mixture``): labels, loss, metric and
refusals, on a tiny byte-vocabulary BERT."""

import pytest
import torch
import torch.nn.functional as F
import transformers

from upcycle.adapters import adapter_of
from upcycle.config import TrainConfig
from upcycle.data.tokenizers import ByteTokenizer
from upcycle.eval import accuracy
from upcycle.eval.tasks import SequenceClassification, make_task

SIZES = {"vocab_size": 259, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
         "num_attention_heads": 2, "max_position_embeddings": 32}  # fmt: skip


def classifier(labels=3):
    torch.manual_seed(0)
    config = transformers.BertConfig(**SIZES, num_labels=labels)
    return transformers.BertForSequenceClassification(config).eval()


def task_for(model, data="text_mixture", **options):
    config = TrainConfig(data=data, steps=1, seq_len=16, label_smoothing=options.pop("label_smoothing", 0.0),
                         data_options={"num_sequences": 30, **options} if data == "text_mixture" else {})  # fmt: skip
    return make_task(model, adapter_of(model), config)


@pytest.fixture(scope="module")
def model():
    return classifier()


def test_each_passage_is_labelled_with_its_domain(model):
    task = task_for(model)
    assert isinstance(task, SequenceClassification) and task.metric == "accuracy" and task.num_classes == 3
    assert isinstance(task.tokenizer, ByteTokenizer)  # a byte-vocabulary model reads bytes
    data = task.dataset("val")
    assert len(data) == len(data.data) == 30 and data.info is data.data.info
    labels = {int(data[i]["labels"]) for i in range(len(data))}
    assert labels == {0, 1, 2}  # every domain is present
    for i in (0, len(data) // 2, len(data) - 1):
        assert torch.equal(data[i]["input_ids"], data.data[i]["input_ids"])
        assert data[i]["labels"] == data.data[i]["domain"]


def test_loss_is_cross_entropy_with_smoothing_and_accuracy_is_top1(model):
    task = task_for(model, label_smoothing=0.2)
    ids, labels = torch.randint(0, 259, (6, 16)), torch.tensor([0, 1, 2, 0, 1, 2])
    loss, metrics = task.loss(model, {"input_ids": ids, "labels": labels}, torch.Generator())
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(logits, labels, label_smoothing=0.2)), rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))
    batches = [{"input_ids": ids, "labels": labels}, {"input_ids": ids[:2], "labels": labels.flip(0)[:2]}]
    assert task.evaluate(model, batches) == {"accuracy": accuracy(model, batches)}


def test_refusals():
    with pytest.raises(ValueError, match="no classification head"):
        SequenceClassification(transformers.BertModel(transformers.BertConfig(**SIZES)), None, None)
    with pytest.raises(ValueError, match="shakespeare has no domain labels"):
        task_for(classifier(), data="shakespeare").dataset("val")
    with pytest.raises(ValueError, match="predicts 2 classes but text_mixture has 3 domains"):
        task_for(classifier(labels=2)).dataset("val")
    with pytest.raises(ValueError, match="not the byte vocabulary"):
        task_for(transformers.BertForSequenceClassification(transformers.BertConfig(**{**SIZES, "vocab_size": 97})))
