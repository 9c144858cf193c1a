"""Python code: the standard library source of the running interpreter, as whole ``.py`` files.

Where from: ``sysconfig.get_paths()["stdlib"]`` (or any folder of ``.py`` files given as ``root=``). Left out: tests
(``test/``, ``tests/``), installed packages (``site-packages``), IDLE, lib2to3, turtledemo, ensurepip, the generated
codec tables in ``encodings/``, and ``pydoc_data/`` (that is the ``python_docs`` domain). What remains (about 10 MB
on CPython 3.11) is capped at ``max_chars`` (5,000,000 by default) by a fixed seeded choice of files, so the corpus
is deterministic for a given interpreter; ``info.files`` names the files, which differ between Python versions.

Split rule: by module file, a seeded choice of 5 % of the files for val and 5 % for test; the rest train.
"""

from __future__ import annotations

import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .packing import PackedTextDataset
from .registry import register
from .splits import split_files
from .text import DEFAULT_SEQ_LEN, Corpus, text_dataset

NAME = "python_code"
MAX_CHARS = 5_000_000
HELD_OUT_FRACTION = 0.05  # of the files, for val and again for test
SELECTION_SEED = 0  # which files fit under the cap does not depend on the split seed
SKIP_ANYWHERE = {"test", "tests", "__pycache__", "site-packages", "dist-packages"}
SKIP_TOP = {"idlelib", "lib2to3", "turtledemo", "ensurepip", "encodings", "pydoc_data", "__phello__"}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _wanted(rel: Path) -> bool:
    parts = rel.parts
    if SKIP_ANYWHERE.intersection(parts[:-1]):
        return False
    return not (len(parts) > 1 and (parts[0] in SKIP_TOP or parts[0].startswith("config-")))


@lru_cache(maxsize=2)
def _documents(folder: str, max_chars: int) -> dict[str, str]:
    root = Path(folder)
    paths = sorted(p for p in root.rglob("*.py") if p.is_file() and _wanted(p.relative_to(root)))
    if not paths:
        raise FileNotFoundError(f"dataset {NAME!r}: no .py files under {root}")
    docs: dict[str, str] = {}
    total = 0
    for i in np.random.default_rng(SELECTION_SEED).permutation(len(paths)):
        text = paths[i].read_bytes().decode("utf-8", errors="replace")
        if text.strip() and total + len(text) <= max_chars:  # empty __init__.py files carry nothing
            docs[paths[i].relative_to(root).as_posix()] = text
            total += len(text)
    return docs


@lru_cache(maxsize=4)
def _corpus(folder: str, max_chars: int, seed: int) -> Corpus:
    docs = _documents(folder, max_chars)
    n_held = max(1, round(HELD_OUT_FRACTION * len(docs)))
    return Corpus(NAME, folder, docs, split_files(docs, n_held, n_held, seed))


def corpus(root: str | Path | None = None, max_chars: int = MAX_CHARS, seed: int = 0) -> Corpus:
    folder = stdlib_dir() if root is None else Path(root).expanduser()
    return _corpus(str(folder.resolve()), int(max_chars), seed)


@register(NAME)
def load(
    split: str,
    *,
    tokenizer: Any = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_tokens: int | None = None,
    seed: int = 0,
    root: str | Path | None = None,
    max_chars: int = MAX_CHARS,
) -> PackedTextDataset:
    data = corpus(root, max_chars, seed)
    return text_dataset(data, split, tokenizer=tokenizer, seq_len=seq_len, max_tokens=max_tokens, seed=seed)
