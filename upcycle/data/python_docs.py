"""Python docs: technical English prose from the running interpreter, one document per documentation topic.

Where from: ``pydoc_data/topics.py`` of the standard library (the Language Reference sections that ``help()`` shows:
a dict of about 80 topics, 0.5 M characters) plus the interpreter's ``LICENSE.txt`` when present. Nothing is
downloaded. Document names are ``topics/<key>`` and ``LICENSE.txt``.

Split rule: by topic, a seeded choice of 10 % of the documents for val and 10 % for test; the rest train.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Any

from .packing import PackedTextDataset
from .python_code import stdlib_dir
from .registry import register
from .splits import split_files
from .text import DEFAULT_SEQ_LEN, Corpus, text_dataset

NAME = "python_docs"
HELD_OUT_FRACTION = 0.10


@lru_cache(maxsize=4)
def corpus(seed: int = 0) -> Corpus:
    module = importlib.import_module("pydoc_data.topics")
    docs = {f"topics/{key}": text.strip("\n") + "\n" for key, text in sorted(module.topics.items())}
    license_file = stdlib_dir() / "LICENSE.txt"
    if license_file.is_file():
        docs["LICENSE.txt"] = license_file.read_text(encoding="utf-8", errors="replace")
    n_held = max(1, round(HELD_OUT_FRACTION * len(docs)))
    return Corpus(NAME, str(module.__file__), docs, split_files(docs, n_held, n_held, seed))


@register(NAME)
def load(
    split: str,
    *,
    tokenizer: Any = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_tokens: int | None = None,
    seed: int = 0,
) -> PackedTextDataset:
    return text_dataset(corpus(seed), split, tokenizer=tokenizer, seq_len=seq_len, max_tokens=max_tokens, seed=seed)
