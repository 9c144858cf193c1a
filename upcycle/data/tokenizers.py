"""Tokenizers with one small interface, so packing works the same with our byte tokenizer or a Hugging Face one.

Interface: ``encode(text) -> list[int]``, ``encode_array(text) -> int64 ndarray``, ``decode(ids) -> str``,
``encode_example(text, max_len)`` (one classifier input, with special tokens), ``vocab_size``, ``bos_id``,
``eos_id``, ``pad_id``, ``name``, ``fingerprint`` (what decides the ids, for caches). ``eos_id`` is the separator the
packer puts after every document.

- ``ByteTokenizer``: UTF-8 bytes 0-255 plus BOS=256, EOS=257, PAD=258 (vocab 259). No files, no training, lossless.
- ``HFTokenizer``: wraps any Hugging Face tokenizer object or a local folder (read offline). Text is encoded without
  the model's special tokens; the separator is its EOS token, else SEP (BERT), else BOS.

``get_tokenizer(spec)`` turns the ``tokenizer=`` option of the text datasets into one of these.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np


class ByteTokenizer:
    """Bytes of the UTF-8 encoding are the tokens; three specials follow them."""

    name = "bytes"
    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 259

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_example(self, text: str, max_len: int) -> list[int]:
        """One example for a classifier: BOS, then the bytes, cut at ``max_len`` tokens."""
        return [self.bos_id, *text.encode("utf-8")][:max_len]

    @property
    def fingerprint(self) -> str:
        return "bytes"

    def decode(self, ids: Iterable[int]) -> str:
        # specials carry no text; a cut in the middle of a multi-byte character decodes as U+FFFD
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


class HFTokenizer:
    """A thin wrapper over a Hugging Face tokenizer (``PreTrainedTokenizerBase``)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
        self.vocab_size = len(tokenizer)  # includes added tokens: the embedding must cover every id
        ids = {key: getattr(tokenizer, f"{key}_token_id", None) for key in ("eos", "sep", "bos", "cls", "pad")}
        self.eos_id = next((ids[k] for k in ("eos", "sep", "bos") if ids[k] is not None), None)
        if self.eos_id is None:
            raise ValueError(f"tokenizer {self.name} has no EOS, SEP or BOS token to separate documents with")
        self.bos_id = ids["bos"] if ids["bos"] is not None else ids["cls"]
        self.pad_id = ids["pad"] if ids["pad"] is not None else self.eos_id

    @classmethod
    def from_path(cls, path: str | Path) -> HFTokenizer:
        from transformers import AutoTokenizer  # late: importing transformers is slow and not needed for bytes

        # a local folder is read locally; anything else is a hub id the user named (HF_HUB_OFFLINE=1 in their
        # environment makes it fail instead of downloading; upcycle never sets it)
        return cls(AutoTokenizer.from_pretrained(str(path)))

    def encode(self, text: str) -> list[int]:
        # verbose=False: a whole file is longer than model_max_length on purpose (it is packed into chunks later)
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def encode_example(self, text: str, max_len: int) -> list[int]:
        """One example for a classifier: with the model's special tokens (BERT: [CLS] ... [SEP]), cut at
        ``max_len`` tokens."""
        return list(self.tokenizer(text, truncation=True, max_length=max_len)["input_ids"])

    @property
    def fingerprint(self) -> str:
        """What decides the token ids: the whole tokenizer definition where it has one, else its name and size."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        text = backend.to_str() if backend is not None else f"{self.name}:{self.vocab_size}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


Tokenizer = ByteTokenizer | HFTokenizer


def get_tokenizer(spec: Any = None) -> Tokenizer:
    """``None`` -> ``ByteTokenizer``; a wrapper -> itself; a path -> ``HFTokenizer`` read from that folder;
    any other object is taken to be a Hugging Face tokenizer."""
    if spec is None:
        return ByteTokenizer()
    if isinstance(spec, (ByteTokenizer, HFTokenizer)):
        return spec
    if isinstance(spec, (str, Path)):
        return HFTokenizer.from_path(spec)
    if not callable(spec) or not hasattr(spec, "decode"):
        raise TypeError(f"tokenizer must be None, a path or a Hugging Face tokenizer, got {type(spec).__name__}")
    return HFTokenizer(spec)
