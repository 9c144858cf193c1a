"""Rotary position embeddings (RoPE, Su et al., arXiv 2104.09864) in the half-split layout of transformers' Llama
(``rotate_half``), and grouped-query key/value sharing (GQA, arXiv 2305.13245). Pure torch: upcycle's own LMs and
the BAM Mixture of Attention (``attention.py``) use the same functions.

Dimension letters: b batch, t positions, hd head width, heads any number of heads, kv key/value heads, s keys.
"""

from __future__ import annotations

import torch


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin of each position's rotation angles: ``(b, t)`` positions -> two ``(b, t, hd)`` tensors.

    Computed per forward instead of cached in a buffer: it is (b·t·hd) work, and a buffer would be one more tensor
    that ``from_pretrained``'s meta-device loading must re-create.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float, device=position_ids.device) / head_dim
    inv_freq = 1.0 / (theta**exponents)  # (hd/2,): angle per position, fast to slow
    angles = position_ids[..., None].float() * inv_freq  # (b, t, hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (b, t, hd): channel i pairs with i + hd/2 (Llama's layout)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair (i, i + hd/2) of ``x (b, heads, t, hd)`` by its position's angle."""
    first, second = x.chunk(2, dim=-1)  # (b, heads, t, hd/2) each
    rotated = torch.cat((-second, first), dim=-1)  # x rotated by 90° in every pair
    return x * cos[:, None] + rotated * sin[:, None]  # cos, sin broadcast over heads


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(b, kv, s, hd)`` -> ``(b, kv·groups, s, hd)``: each key/value head serves ``groups`` query heads (GQA)."""
    if groups == 1:
        return x
    b, kv, s, hd = x.shape
    return x[:, :, None].expand(b, kv, groups, s, hd).reshape(b, kv * groups, s, hd)
