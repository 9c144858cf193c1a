"""Offline datasets behind one interface: ``load_dataset(name, split, **options)``.

    from upcycle.data import list_datasets, load_dataset
    train = load_dataset("fashion_mnist", "train", image_size=32, channels=3, augment=True)
    train.info          # DatasetInfo(name="fashion_mnist", kind="image", size=55000, num_classes=10, ...)
    train[0]            # {"x": float32 [3, 32, 32], "labels": int64 []}
    lm = load_dataset("shakespeare", "val", seq_len=256)   # {"input_ids": int64 [256]}

Image sets: ``fashion_mnist``, ``mnist5k``, ``digits``. Text domains: ``shakespeare``, ``python_code``,
``python_docs`` and their ``text_mixture``. Splits are ``train``/``val``/``test``, fixed by ``seed`` (default 0): val
is carved from the training data, test is never used for choices, and text is split by whole file. Nothing is
downloaded at load time: ``fetch_all()`` (or ``python -m upcycle.data.fetch``) obtains what can be obtained, and a
missing dataset raises ``FileNotFoundError`` naming the command that obtains it. See each module's docstring for
where its data comes from and its split rule.
"""

from . import digits, fashion_mnist, mnist5k, python_code, python_docs, shakespeare, text_mixture  # noqa: F401  (register)
from .fetching import fetch_all
from .image import ImageDataset
from .info import DatasetInfo
from .mixing import mix_batch, soft_cross_entropy
from .packing import PackedTextDataset, pack_documents
from .paths import data_root
from .registry import UnknownDatasetError, dataset_options, list_datasets, load_dataset
from .splits import SPLITS
from .tokenizers import ByteTokenizer, HFTokenizer, get_tokenizer

__all__ = [
    "SPLITS",
    "ByteTokenizer",
    "DatasetInfo",
    "HFTokenizer",
    "ImageDataset",
    "PackedTextDataset",
    "UnknownDatasetError",
    "data_root",
    "dataset_options",
    "fetch_all",
    "get_tokenizer",
    "list_datasets",
    "load_dataset",
    "mix_batch",
    "pack_documents",
    "soft_cross_entropy",
]
