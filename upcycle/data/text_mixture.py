"""``text_mixture``: the three text domains (shakespeare, python_code, python_docs) in one dataset, for BAM/BTX.

Each domain is packed on its own (a sequence never spans two domains) with the same tokenizer, ``seq_len`` and
file-level split as when loaded alone; the mixture then takes sequences from each domain in proportion to
``weights``. Items are ``{"input_ids": int64 [seq_len], "domain": int64 []}`` where ``domain`` indexes
``info.domains`` (always all three, in the order of ``DOMAINS``, so ids are stable across weightings), and
``dataset.per_domain()`` gives each domain's packed split, for reporting held-out loss per domain.

``sources`` mixes the user's text instead: ``{domain name: SPEC}`` (a text file, a folder, a hub dataset; see
``upcycle.data.user``), each read as a causal-LM set (its rows are its documents), in that order; a SPEC may also
be one of the three built-in domains.

How many sequences per domain:
- no ``weights``, ``max_tokens`` or ``num_sequences``: all of every domain (the natural mixture);
- otherwise the weights (default: proportional to each domain's characters in this split) are normalised, and the
  total is the largest that needs no repetition, capped by ``max_tokens // seq_len``; each domain contributes a
  seeded choice of its sequences;
- ``num_sequences`` sets the total outright; a domain that runs short is repeated (whole seeded passes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from . import python_code, python_docs, shakespeare
from .info import DatasetInfo
from .packing import PackedTextDataset
from .registry import register
from .text import DEFAULT_SEQ_LEN, Corpus, text_dataset
from .tokenizers import get_tokenizer

NAME = "text_mixture"
CORPORA: dict[str, Callable[[int], Corpus]] = {
    "shakespeare": lambda seed: shakespeare.corpus(None, seed),
    "python_code": lambda seed: python_code.corpus(None, python_code.MAX_CHARS, seed),
    "python_docs": lambda seed: python_docs.corpus(seed),
}
DOMAINS = tuple(CORPORA)


class MixtureDataset(PackedTextDataset):
    def __init__(self, sequences, info, domain_ids, parts: dict[str, PackedTextDataset]):
        super().__init__(sequences, info, domain_ids)
        self.parts = parts

    def per_domain(self) -> dict[str, PackedTextDataset]:
        """Each included domain's packed split (all of it, before the mixture's selection)."""
        return dict(self.parts)


def _normalise(weights: dict[str, float], domains: tuple[str, ...] = DOMAINS) -> dict[str, float]:
    unknown = sorted(set(weights) - set(domains))
    if unknown:
        raise ValueError(f"unknown domain(s) {', '.join(unknown)} in weights; domains: {', '.join(domains)}")
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    total = sum(weights.values())
    return {d: weights[d] / total for d in domains if weights.get(d, 0) > 0}


def _largest_remainder(weights: dict[str, float], total: int) -> dict[str, int]:
    """Integer counts summing to ``total`` as close as possible to ``weight * total``."""
    exact = {d: w * total for d, w in weights.items()}
    counts = {d: math.floor(x) for d, x in exact.items()}
    for d in sorted(exact, key=lambda d: counts[d] - exact[d])[: total - sum(counts.values())]:
        counts[d] += 1
    return counts


def _choose(available: int, count: int, rng: np.random.Generator) -> np.ndarray:
    passes = [rng.permutation(available) for _ in range(max(1, math.ceil(count / available)))]
    return np.sort(np.concatenate(passes)[:count])  # sorted within a domain; a DataLoader shuffles anyway


@register(NAME)
def load(
    split: str,
    *,
    weights: dict[str, float] | None = None,
    domain: str | None = None,
    tokenizer: Any = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_tokens: int | None = None,
    num_sequences: int | None = None,
    seed: int = 0,
    sources: dict[str, str] | None = None,
) -> MixtureDataset:
    specs = dict(sources) if sources else {d: d for d in DOMAINS}  # domain name -> what is read for it
    domains = tuple(specs)
    if domain is not None:  # one domain of the mixture, with the mixture's domain ids
        if weights is not None:
            raise ValueError("pass weights or domain, not both")
        weights = {domain: 1.0}
    tok = get_tokenizer(tokenizer)  # once, so a Hugging Face tokenizer is read once for all domains
    included = list(_normalise(weights, domains)) if weights else list(domains)
    corpora = {d: CORPORA[specs[d]](seed) for d in included if specs[d] in CORPORA}

    def packed(d: str, cap: int | None) -> PackedTextDataset:
        """One domain's packed split: a built-in domain's files, or the user's SPEC read as causal-LM text."""
        if d in corpora:
            return text_dataset(corpora[d], split, tokenizer=tok, seq_len=seq_len, max_tokens=cap, seed=seed)
        from .spec import load_spec

        return load_spec(specs[d], split, task="causal-lm", tokenizer=tok, seq_len=seq_len, seed=seed, max_tokens=cap)

    natural = weights is None and max_tokens is None and num_sequences is None
    if weights is None:  # in proportion to each domain's text: characters of the files, else packed sequences
        builtin = len(corpora) == len(included)
        weights = {d: float(corpora[d].num_chars(split) if builtin else len(packed(d, None))) for d in included}
    weights = _normalise(weights, domains)

    parts = {}
    for d in weights:
        # a little more than this domain's share, so the selection below is never short by rounding
        cap = None if max_tokens is None else math.ceil(weights[d] * max_tokens) + seq_len
        parts[d] = packed(d, cap)
    available = {d: len(part) for d, part in parts.items()}

    if natural:
        counts = available
    else:
        total = num_sequences
        if total is None:
            total = min(math.floor(available[d] / w) for d, w in weights.items())
            if max_tokens is not None:
                total = min(total, max_tokens // seq_len)
        counts = _largest_remainder(weights, total)
    rng = np.random.default_rng(seed)
    chosen = {d: _choose(available[d], n, rng) for d, n in counts.items() if n > 0}
    if not chosen:
        raise ValueError("the mixture is empty; raise max_tokens or num_sequences")
    sequences = torch.cat([parts[d].sequences[torch.from_numpy(idx)] for d, idx in chosen.items()])  # [N, seq_len]
    domain_ids = torch.cat([torch.full((len(idx),), domains.index(d), dtype=torch.int64) for d, idx in chosen.items()])
    info = DatasetInfo(
        name=NAME,
        kind="text",
        split=split,
        size=sequences.shape[0],
        source=", ".join(f"{d}: {parts[d].info.source}" for d in parts),
        seed=seed,
        vocab_size=tok.vocab_size,
        seq_len=seq_len,
        num_tokens=sequences.numel(),
        domain="mixture",
        domains=domains,
        files=tuple(f"{d}/{name}" for d in parts for name in parts[d].info.files),
    )
    return MixtureDataset(sequences, info, domain_ids, parts)
