"""``load_spec``: one split of a user dataset (``upcycle.data.user``) as model-ready items for one task.

    causal-lm              the text column's rows (documents; a ``.txt`` file: paragraphs), each followed by EOS,
                           packed into ``[seq_len]`` blocks: ``{"input_ids"}`` (see ``packing``)
    text-classification   each text tokenized with the model's special tokens, cut at ``seq_len`` and padded to the
                           split's longest: ``{"input_ids", "attention_mask", "labels"}``
    image-classification  each image read as RGB (or grey for a 1-channel model) through the model's own timm data
                           transform (``data_config``: size, interpolation, crop, mean, std; training adds timm's
                           standard augmentation): ``{"x", "labels"}``

Tokenized text is cached under ``<data cache>/tokenized`` by a hash of its content (the rows, the tokenizer, the
length and the task), not by the file's path: a moved file is found again and an edited one is tokenized again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..errors import UserError
from .info import DatasetInfo
from .packing import PackedTextDataset, pack_documents
from .paths import data_root
from .tokenizers import get_tokenizer
from .user import VAL_FRACTION, class_names, find_column, infer_task, label_ids, pick_split, read_splits

TASKS = ("causal-lm", "text-classification", "image-classification")


def load_spec(spec: str, split: str, *, task: str | None = None, tokenizer=None, pad_id: int | None = None,
              seq_len: int = 256, seed: int = 0, data_config: dict | None = None, image_size: int | None = None,
              channels: int = 3, augment: bool = False,
              text_column: str | None = None, label_column: str | None = None, image_column: str | None = None,
              val_fraction: float = VAL_FRACTION, max_tokens: int | None = None) -> Dataset:  # fmt: skip
    """Split ``split`` of the dataset ``spec`` names, as items for ``task`` (one of ``TASKS``; None: inferred from
    the columns, see ``infer_task``). ``pad_id``: what classified text is padded with (default: the tokenizer's)."""
    if task is not None and task not in TASKS:
        raise UserError(f"--task takes {', '.join(TASKS)}; got {task!r}")
    splits = read_splits(spec)
    rows = pick_split(splits, split, val_fraction, seed)
    task = task or infer_task(rows)
    train = pick_split(splits, "train", val_fraction, seed)  # class names come from the training rows
    if task == "image-classification":
        return _images(spec, split, rows, train, data_config, image_size, channels, augment, image_column,
                       label_column, seed)  # fmt: skip
    text = find_column(rows, "text", text_column, spec)
    tok = get_tokenizer(tokenizer)
    if task == "causal-lm":
        return _packed_text(spec, split, rows[text], tok, seq_len, seed, max_tokens)
    return _classified_text(spec, split, rows, train, text, label_column, tok, seq_len, seed,
                            tok.pad_id if pad_id is None else pad_id)  # fmt: skip


def _packed_text(spec, split, texts, tok, seq_len, seed, max_tokens) -> PackedTextDataset:
    texts = [t for t in texts if t and t.strip()]
    key = _content_key("causal-lm", tok, seq_len, max_tokens, texts)
    tensors = _cached(key, lambda: {"input_ids": pack_documents(
        ((str(i), t) for i, t in enumerate(tqdm(texts, desc=f"tokenize {split}", unit="row", leave=False))),
        tok, seq_len, max_tokens)[0]})  # fmt: skip
    sequences = tensors["input_ids"]  # [N, seq_len]
    info = DatasetInfo(name=spec, kind="text", split=split, size=sequences.shape[0], source=spec, seed=seed,
                       vocab_size=tok.vocab_size, seq_len=seq_len, num_tokens=sequences.numel())  # fmt: skip
    return PackedTextDataset(sequences, info)


class ClassifiedText(Dataset):
    """Items ``{"input_ids": int64 [L], "attention_mask": int64 [L], "labels": int64 []}``, L = the split's
    longest text after tokenization (at most ``seq_len``)."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, info: DatasetInfo):
        self.ids, self.mask, self.labels, self.info = ids, mask, labels, info  # [N, L], [N, L], [N]

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def _classified_text(spec, split, rows, train, text, label_column, tok, seq_len, seed, pad_id) -> ClassifiedText:
    classes, labels = _labels(rows, train, label_column, spec)
    texts = [str(t) for t in rows[text]]
    key = _content_key(f"text-classification:{pad_id}", tok, seq_len, None, texts)

    def tokenize() -> dict[str, torch.Tensor]:
        encoded = [tok.encode_example(t, seq_len) for t in tqdm(texts, desc=f"tokenize {split}", unit="row",
                                                                 leave=False)]  # fmt: skip
        length = max(1, max(len(ids) for ids in encoded))
        ids = torch.full((len(encoded), length), pad_id, dtype=torch.int64)
        mask = torch.zeros(len(encoded), length, dtype=torch.int64)
        for row, tokens in enumerate(encoded):
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
            mask[row, : len(tokens)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    tensors = _cached(key, tokenize)
    info = DatasetInfo(name=spec, kind="text", split=split, size=len(texts), source=spec, seed=seed,
                       num_classes=len(classes), classes=classes, vocab_size=tok.vocab_size,
                       seq_len=tensors["input_ids"].shape[1])  # fmt: skip
    return ClassifiedText(tensors["input_ids"], tensors["attention_mask"], labels, info)


class ClassifiedImages(Dataset):
    """Items ``{"x": float32 [C, S, S], "labels": int64 []}``: each image through ``transform``."""

    def __init__(self, rows, column: str, labels: torch.Tensor, transform: Callable, mode: str, info: DatasetInfo):
        self.rows, self.column, self.labels, self.transform, self.mode, self.info = (
            rows, column, labels, transform, mode, info)  # fmt: skip

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image = self.rows[i][self.column].convert(self.mode)
        return {"x": self.transform(image), "labels": self.labels[i]}


def _images(spec, split, rows, train, data_config, image_size, channels, augment, image_column, label_column,
            seed) -> ClassifiedImages:  # fmt: skip
    from timm.data import create_transform

    column = find_column(rows, "image", image_column, spec)
    classes, labels = _labels(rows, train, label_column, spec)
    config = dict(data_config or {"input_size": (channels, image_size or 224, image_size or 224),
                                  "mean": (0.5,) * channels, "std": (0.5,) * channels})  # fmt: skip
    channels = config["input_size"][0]
    if channels not in (1, 3):
        raise UserError(f"--data {spec}: images are read as RGB or grey; the model takes {channels} channels")
    training = augment and split == "train"
    transform = create_transform(**config, is_training=training)
    info = DatasetInfo(name=spec, kind="image", split=split, size=len(rows), source=spec, seed=seed,
                       num_classes=len(classes), classes=classes, image_size=config["input_size"][-1],
                       channels=channels, mean=tuple(config["mean"]), std=tuple(config["std"]),
                       augment=training)  # fmt: skip
    return ClassifiedImages(rows, column, labels, transform, "RGB" if channels == 3 else "L", info)


def _labels(rows, train, label_column: str | None, spec: str) -> tuple[tuple[str, ...], torch.Tensor]:
    """The class names, taken from the training rows so every split maps a label alike, and each row's class index
    (int64 [N])."""
    label = find_column(rows, "label", label_column, spec)
    classes = class_names(train, label)
    return classes, torch.from_numpy(label_ids(rows, label, classes, spec))


def _content_key(task: str, tok, seq_len: int, max_tokens: int | None, texts: list[str]) -> str:
    digest = hashlib.sha256(json.dumps([task, tok.fingerprint, seq_len, max_tokens]).encode())
    for text in texts:
        digest.update(text.encode("utf-8", errors="surrogatepass") + b"\x00")
    return digest.hexdigest()[:24]


def _cached(key: str, build: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Tensors stored under ``key`` in the tokenized-data cache, built (and stored atomically) the first time."""
    from safetensors.torch import load_file, save_file

    path = data_root() / "tokenized" / f"{key}.safetensors"
    if path.is_file():
        return load_file(path)
    tensors = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{id(tensors)}.partial")
    save_file({name: t.contiguous() for name, t in tensors.items()}, partial)
    partial.replace(path)  # atomic: a concurrent reader sees the whole file or none
    return tensors
