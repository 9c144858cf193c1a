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
from ..layers import real_tokens
from ..record import record_of


class ImageClassification:
    metric = "accuracy"

    def __init__(self, model: nn.Module, adapter, config):
        self.model, self.num_classes, self.config = model, model.num_classes, config

    def dataset(self, split: str):
        c = self.config
        data = image_dataset(self.model, c.data, split, augment=c.augment and split == "train", seed=c.seed,
                             **c.data_options)  # fmt: skip
        _check_classes(self.num_classes, data, c.data)
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
        from ..data.registry import is_builtin

        task = {} if is_builtin(self.config.data) else {"task": "causal-lm"}
        return load_dataset(self.config.data, split, tokenizer=self.tokenizer, seq_len=self.config.seq_len,
                            seed=self.config.seed, **task, **self.config.data_options)  # fmt: skip

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        loss = next_token_loss(model, batch["input_ids"])
        return loss, {"perplexity": math.exp(min(float(loss.detach()), 50.0))}

    def evaluate(self, model: nn.Module, batches) -> dict:
        from .metrics import perplexity

        value = perplexity(model, batches)
        return {"loss": math.log(value), "perplexity": value}


class SequenceClassification:
    """A transformers ``*ForSequenceClassification`` (an encoder, or a decoder pooling its last token) on labelled
    texts: the user's (padded, with an attention mask) or a built-in text set whose items carry a ``domain`` id
    (``text_mixture``: the label of a passage is the domain it was taken from)."""

    metric = "accuracy"

    def __init__(self, model: nn.Module, adapter, config):
        if not type(model).__name__.endswith("ForSequenceClassification"):
            raise UserError(f"{type(model).__name__} has no classification head; give it one with --num-labels N "
                            "(or --reset-head, sized from the data's labels)")  # fmt: skip
        self.config = config
        self.num_classes = model.config.num_labels
        self.tokenizer = _tokenizer_for(model)
        # pad with the model's own padding id: a decoder pools at its last token that is not padding
        pad = getattr(model.config, "pad_token_id", None)
        self.pad_id = pad if pad is not None else self.tokenizer.pad_id

    def dataset(self, split: str):
        from ..data import load_dataset
        from ..data.registry import is_builtin

        c = self.config
        if not is_builtin(c.data):
            data = load_dataset(c.data, split, task="text-classification", tokenizer=self.tokenizer,
                                pad_id=self.pad_id, seq_len=c.seq_len, seed=c.seed, **c.data_options)  # fmt: skip
            _check_classes(self.num_classes, data, c.data)
            return data
        data = load_dataset(c.data, split, tokenizer=self.tokenizer, seq_len=c.seq_len, seed=c.seed,
                            **c.data_options)  # fmt: skip
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
        mask = batch.get("attention_mask")
        with real_tokens(mask):  # padding is neither routed nor penalised
            logits = model(input_ids=batch["input_ids"], attention_mask=mask).logits  # [b, classes]
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


def _check_classes(num_classes: int, data, name: str) -> None:
    if data.info.num_classes != num_classes:
        raise UserError(
            f"the model predicts {num_classes} classes but {name} has {data.info.num_classes}; give the model a "
            f"fresh head of that size (--num-labels {data.info.num_classes}), or pretrain / convert one with it"
        )


def image_dataset(model: nn.Module, data: str, split: str, *, augment: bool = False, seed: int = 0, **options):
    """Split ``split`` of the images ``data`` names, at ``model``'s input size and channels: a built-in set, or the
    user's images through the model's own timm transform (size, interpolation, crop, mean, std)."""
    from ..adapters import adapter_of
    from ..data import load_dataset
    from ..data.registry import is_builtin

    example = adapter_of(model).example_inputs(model, batch=1)["x"]  # [1, C, S, S]
    channels, size = example.shape[1], example.shape[-1]
    if is_builtin(data):
        options = {"image_size": size, "channels": channels, **options}
    else:
        options = {"task": "image-classification", "data_config": _timm_data_config(model, channels, size), **options}
    return load_dataset(data, split, augment=augment, seed=seed, **options)


def _timm_data_config(model: nn.Module, channels: int, image_size: int) -> dict:
    """The model's own timm data config (input size, interpolation, crop, mean, std), for the user's images."""
    from timm.data import resolve_model_data_config

    config = resolve_model_data_config(model)
    config["input_size"] = (channels, image_size, image_size)  # what the model was built for, whatever its tag said
    for key in ("mean", "std"):
        if len(config[key]) != channels:
            config[key] = (sum(config[key]) / len(config[key]),) * channels
    return config


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


TASKS = {"image-classification": ImageClassification, "causal-lm": CausalLM,
         "text-classification": SequenceClassification}  # fmt: skip
# what a family is trained for unless the run says otherwise
TASK_OF_ADAPTER = {"image_classification": "image-classification", "causal_lm": "causal-lm",
                   "encoder": "text-classification"}  # fmt: skip

# the dataset option each task passes, which only datasets of the right kind take
DATA_KIND = {"image-classification": ("image_size", "image"), "causal-lm": ("tokenizer", "text"),
             "text-classification": ("tokenizer", "text")}  # fmt: skip


def make_task(model: nn.Module, adapter, config):
    """The run's task: ``config.task`` when given (an LM trained as a text classifier), else the family's."""
    task = getattr(config, "task", None) or TASK_OF_ADAPTER.get(adapter.task)
    if task not in TASKS:
        raise ValueError(f"training {adapter.task} models is not supported yet; supported: {sorted(TASKS)}")
    check_data_kind(task, config.data)
    return TASKS[task](model, adapter, config)


def check_data_kind(task: str, data: str) -> None:
    """Refuse a dataset of the wrong kind (text for a vision model, images for an LM) before anything loads."""
    from ..data.registry import dataset_options, is_builtin, list_datasets

    if not is_builtin(data):
        return  # the user's data (or an unknown name): the loader reads the columns it needs, or names the problem
    option, kind = DATA_KIND[task]
    if option not in dataset_options(data):
        names = [name for name in list_datasets() if option in dataset_options(name)]
        raise UserError(f"{task.replace('-', ' ')} models train on {kind} datasets and {data!r} is not one; "
                        f"choose one of {', '.join(names)}")  # fmt: skip
