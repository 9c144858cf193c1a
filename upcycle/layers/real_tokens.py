"""Which tokens are real: padding is never routed, never computed by an expert and counts in no routing statistic,
load-balancing loss or sparsity loss.

The model's forward runs inside ``real_tokens(attention_mask)`` (``[b, t]``, 1 for tokens and 0 for padding, Hugging
Face's convention). An MoE layer whose input has those leading dimensions routes only the real tokens and gives
padding a zero FFN output: padded positions are masked out of attention and of pooling, so nothing reads it. A
context variable, because the mask cannot reach an FFN through the host model's block code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

_MASK: ContextVar[torch.Tensor | None] = ContextVar("upcycle_real_tokens", default=None)


@contextmanager
def real_tokens(attention_mask: torch.Tensor | None) -> Iterator[None]:
    """Within the block, MoE layers (and sparsity penalties) see only the tokens where ``attention_mask`` is 1."""
    padded = attention_mask is not None and not bool(attention_mask.all())
    token = _MASK.set(attention_mask.bool() if padded else None)
    try:
        yield
    finally:
        _MASK.reset(token)


def real_rows(x: torch.Tensor) -> torch.Tensor | None:
    """``[t]`` bool over the flattened tokens of ``x`` (``[b, t, ...]``) when padding is masked and ``x``'s leading
    dimensions are the mask's; None otherwise (every token is real)."""
    mask = _MASK.get()
    if mask is None or tuple(x.shape[: mask.ndim]) != tuple(mask.shape):
        return None
    return mask.reshape(-1)
