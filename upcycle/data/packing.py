"""Packing text into fixed-length sequences, and the dataset that serves them.

Documents (whole files) are encoded, each followed by the tokenizer's EOS id as separator, concatenated into one
stream and cut into non-overlapping chunks of ``seq_len`` tokens; the tail shorter than ``seq_len`` is dropped, so
every item has the same length and there is no padding. Labels are the inputs shifted by one, which the training
loop computes; a chunk may span a document boundary, with the separator in between (the GPT-2 recipe).
``max_tokens`` caps the stream before it is cut, and encoding stops as soon as the cap is reached.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch.utils.data import Dataset

from .info import DatasetInfo
from .tokenizers import Tokenizer


def pack_documents(
    documents: Iterable[tuple[str, str]], tokenizer: Tokenizer, seq_len: int, max_tokens: int | None = None
) -> tuple[torch.Tensor, list[str]]:
    """``(name, text)`` pairs -> int64 ``[N, seq_len]`` and the names of the documents that contributed tokens."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if max_tokens is not None and max_tokens < seq_len:
        raise ValueError(f"max_tokens={max_tokens} is less than one sequence of seq_len={seq_len}")
    separator = np.array([tokenizer.eos_id], dtype=np.int64)
    pieces: list[np.ndarray] = []
    names: list[str] = []
    starts: list[int] = []  # stream offset where each document begins
    total = 0
    for name, text in documents:
        if max_tokens is not None and total >= max_tokens:
            break
        ids = tokenizer.encode_array(text)  # [n_doc]
        pieces += [ids, separator]
        names.append(name)
        starts.append(total)
        total += len(ids) + 1
    if max_tokens is not None:
        total = min(total, max_tokens)
    n = total // seq_len
    if n == 0:
        raise ValueError(f"{total} tokens do not fill one sequence of seq_len={seq_len}")
    stream = np.concatenate(pieces)[: n * seq_len]  # [n * seq_len]
    # a document whose tokens all fell in the dropped tail did not contribute
    used = [name for name, start in zip(names, starts, strict=True) if start < n * seq_len]
    return torch.from_numpy(stream.reshape(n, seq_len)), used


class PackedTextDataset(Dataset):
    """Items ``{"input_ids": int64 [seq_len]}``; a mixture adds ``"domain": int64 []`` (index into info.domains)."""

    def __init__(self, sequences: torch.Tensor, info: DatasetInfo, domain_ids: torch.Tensor | None = None):
        self.sequences = sequences  # [N, seq_len]
        self.domain_ids = domain_ids  # [N] or None
        self.info = info

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"input_ids": self.sequences[i]}
        if self.domain_ids is not None:
            item["domain"] = self.domain_ids[i]
        return item
