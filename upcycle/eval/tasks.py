"""What a training run optimises and reports, per kind of model: image classification (cross-entropy with label
smoothing / Mixup / CutMix, top-1 accuracy), causal language modelling (next-token cross-entropy, perplexity) and
sequence classification with an encoder (which domain a text passage comes from; cross-entropy, accuracy).

The adapter's ``task`` picks the class; the task knows which dataset options the model needs (input size and
channels of a vision model, the tokenizer of a language model) and how to call the model.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..record import record_of


class ImageClassification:
    metric = "accuracy"

    def __init__(self, model: nn.Module, adapter, config):
        inputs = adapter.example_inputs(model, batch=1)["x"]
        self.channels, self.image_size = inputs.shape[1], inputs.shape[-1]
        self.num_classes = model.num_classes
        self.config = config

    def dataset(self, split: str):
        from ..data import load_dataset

        data = load_dataset(
            self.config.data, split, image_size=self.image_size, channels=self.channels,
            augment=self.config.augment and split == "train", seed=self.config.seed, **self.config.data_options,
        )  # fmt: skip
        if data.info.num_classes != self.num_classes:
            raise ValueError(
                f"the model predicts {self.num_classes} classes but {self.config.data} has {data.info.num_classes}; "
                "build or convert a model with the right head (e.g. upcycle pretrain ... --data NAME)"
            )
        return data

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        from ..data.mixing import mix_batch, soft_cross_entropy

        c = self.config
        hard_labels = batch["labels"]
        if c.mixup or c.cutmix:
            batch = mix_batch(batch, self.num_classes, c.mixup, c.cutmix, 1.0, generator)
        logits = model(batch["x"])
        loss = soft_cross_entropy(logits.float(), batch["labels"], c.label_smoothing)
        accuracy = (logits.detach().argmax(-1) == hard_labels).float().mean()
        return loss, {"accuracy": float(accuracy)}

    def evaluate(self, model: nn.Module, batches) -> dict:
        from .metrics import accuracy

        return {"accuracy": accuracy(model, batches)}


class CausalLM:
    metric = "perplexity"

    def __init__(self, model: nn.Module, adapter, config):
        self.config = config
        self.vocab_size = model.config.vocab_size
        self.tokenizer = _tokenizer_for(model)

    def dataset(self, split: str):
        from ..data import load_dataset

        return load_dataset(self.config.data, split, tokenizer=self.tokenizer, seq_len=self.config.seq_len,
                            seed=self.config.seed, **self.config.data_options)  # fmt: skip

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        loss = next_token_loss(model, batch["input_ids"])
        return loss, {"perplexity": math.exp(min(float(loss.detach()), 50.0))}

    def evaluate(self, model: nn.Module, batches) -> dict:
        from .metrics import perplexity

        value = perplexity(model, batches)
        return {"loss": math.log(value), "perplexity": value}


class SequenceClassification:
    """An encoder with a classification head (e.g. ``BertForSequenceClassification``) on a text dataset whose items
    carry a ``domain`` id (``text_mixture``): the label of a passage is the domain it was taken from."""

    metric = "accuracy"

    def __init__(self, model: nn.Module, adapter, config):
        if not isinstance(getattr(model, "classifier", None), nn.Module):
            raise ValueError(
                f"{type(model).__name__} has no classification head; load the encoder for sequence classification "
                "(e.g. BertForSequenceClassification.from_pretrained(folder, num_labels=3))"
            )
        self.config = config
        self.num_classes = model.config.num_labels
        self.tokenizer = _tokenizer_for(model)

    def dataset(self, split: str):
        from ..data import load_dataset

        data = load_dataset(self.config.data, split, tokenizer=self.tokenizer, seq_len=self.config.seq_len,
                            seed=self.config.seed, **self.config.data_options)  # fmt: skip
        domains = getattr(data.info, "domains", None)
        if not domains:
            raise ValueError(f"{self.config.data} has no domain labels to classify; use text_mixture")
        if len(domains) != self.num_classes:
            raise ValueError(
                f"the model predicts {self.num_classes} classes but {self.config.data} has {len(domains)} domains; "
                "load the encoder with a head of that many labels (num_labels)"
            )
        return DomainLabelled(data)

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        logits = model(input_ids=batch["input_ids"]).logits  # [b, classes]
        loss = F.cross_entropy(logits.float(), batch["labels"], label_smoothing=self.config.label_smoothing)
        accuracy = (logits.detach().argmax(-1) == batch["labels"]).float().mean()
        return loss, {"accuracy": float(accuracy)}

    def evaluate(self, model: nn.Module, batches) -> dict:
        from .metrics import accuracy

        return {"accuracy": accuracy(model, batches)}


class DomainLabelled(torch.utils.data.Dataset):
    """A text dataset's items with their ``domain`` as ``labels``: ``{"input_ids": [T], "labels": []}``."""

    def __init__(self, data):
        self.data, self.info = data, data.info

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.data[i]
        return {"input_ids": item["input_ids"], "labels": item["domain"]}


def next_token_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from tokens ≤ t. ids [b, t]."""
    out = model(input_ids=ids)
    logits = out.logits if hasattr(out, "logits") else out  # [b, t, V]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _tokenizer_for(model: nn.Module):
    """The byte-level tokenizer for byte-vocabulary models, else the checkpoint's own tokenizer."""
    from ..data.tokenizers import ByteTokenizer

    byte = ByteTokenizer()
    if model.config.vocab_size == byte.vocab_size:
        return byte
    record = record_of(model)
    origin = record.files if record is not None else None  # the folder it was read from
    if origin is None or not (Path(origin) / "tokenizer_config.json").is_file():
        raise ValueError(
            f"the model's vocabulary ({model.config.vocab_size}) is not the byte vocabulary and no tokenizer files "
            "came with it; load it from its Hugging Face folder so its tokenizer is found"
        )
    import transformers

    return transformers.AutoTokenizer.from_pretrained(origin)


TASKS = {"image_classification": ImageClassification, "causal_lm": CausalLM, "encoder": SequenceClassification}


# the dataset option each task passes, which only datasets of the right kind take
DATA_KIND = {"image_classification": ("image_size", "image"), "causal_lm": ("tokenizer", "text"),
             "encoder": ("tokenizer", "text")}  # fmt: skip


def make_task(model: nn.Module, adapter, config):
    if adapter.task not in TASKS:
        raise ValueError(f"training {adapter.task} models is not supported yet; supported: {sorted(TASKS)}")
    check_data_kind(adapter.task, config.data)
    return TASKS[adapter.task](model, adapter, config)


def check_data_kind(task: str, data: str) -> None:
    """Refuse a dataset of the wrong kind (text for a vision model, images for an LM) before anything loads."""
    from ..data.registry import UnknownDatasetError, dataset_options, list_datasets

    option, kind = DATA_KIND[task]
    try:
        fits = option in dataset_options(data)
    except UnknownDatasetError:
        return  # named in the error the loader raises
    if not fits:
        names = [name for name in list_datasets() if option in dataset_options(name)]
        raise UserError(f"{task.replace('_', ' ')} models train on {kind} datasets and {data!r} is not one; "
                        f"choose one of {', '.join(names)}")  # fmt: skip
