"""A text domain as a ``Corpus`` (whole files assigned to splits) and the packed dataset built from one split.

Held-out text is held out by whole file: every file belongs to exactly one split, so no line of a val/test file is
ever seen in training. Within a split the files are concatenated in a seeded order (so that ``max_tokens`` takes a
varied sample rather than the alphabetically first files), then packed (see ``packing``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .info import DatasetInfo
from .packing import PackedTextDataset, pack_documents
from .tokenizers import get_tokenizer

DEFAULT_SEQ_LEN = 256


@dataclass(frozen=True)
class Corpus:
    domain: str
    source: str  # where the files were read from
    documents: dict[str, str]  # file name -> its whole text
    splits: dict[str, list[str]]  # split -> sorted file names; the three lists are disjoint

    def ordered(self, split: str, seed: int) -> list[tuple[str, str]]:
        names = self.splits[split]
        order = np.random.default_rng(seed).permutation(len(names))
        return [(names[i], self.documents[names[i]]) for i in order]

    def num_chars(self, split: str) -> int:
        return sum(len(self.documents[name]) for name in self.splits[split])


def text_dataset(
    corpus: Corpus,
    split: str,
    *,
    tokenizer: Any = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_tokens: int | None = None,
    seed: int = 0,
    name: str | None = None,
) -> PackedTextDataset:
    tok = get_tokenizer(tokenizer)
    sequences, used = pack_documents(corpus.ordered(split, seed), tok, seq_len, max_tokens)  # [N, seq_len]
    info = DatasetInfo(
        name=name or corpus.domain,
        kind="text",
        split=split,
        size=sequences.shape[0],
        source=corpus.source,
        seed=seed,
        vocab_size=tok.vocab_size,
        seq_len=seq_len,
        num_tokens=sequences.numel(),
        domain=corpus.domain,
        files=tuple(sorted(used)),
    )
    return PackedTextDataset(sequences, info)
