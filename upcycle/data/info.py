"""``DatasetInfo``: what a loaded split is, in one frozen record every dataset carries as ``dataset.info``.

Image fields (``num_classes``, ``image_size``, ``channels``, ``mean``, ``std``, ``augment``, ``classes``) are set for
``kind == "image"``; text fields (``vocab_size``, ``seq_len``, ``num_tokens``, ``domain``, ``domains``, ``files``) for
``kind == "text"``. The rest is ``None`` or empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    kind: Literal["image", "text"]
    split: str  # "train" | "val" | "test"
    size: int  # number of items (images, or packed sequences)
    source: str = ""  # where the data was read from (a path or a package)
    seed: int = 0  # the split seed
    # image datasets
    num_classes: int | None = None
    classes: tuple[str, ...] = ()
    image_size: int | None = None  # side of the square tensor the dataset yields
    channels: int | None = None
    mean: tuple[float, ...] | None = None  # per channel, applied after scaling pixels to [0, 1]
    std: tuple[float, ...] | None = None
    augment: bool = False  # True only for a train split loaded with augment=True
    # text datasets
    vocab_size: int | None = None
    seq_len: int | None = None
    num_tokens: int | None = None  # size * seq_len
    domain: str | None = None  # "shakespeare" | "python_code" | "python_docs" | "mixture"
    domains: tuple[str, ...] = ()  # text_mixture: the index each item's "domain" refers to
    files: tuple[str, ...] = ()  # text: the whole files (documents) whose tokens this split holds
