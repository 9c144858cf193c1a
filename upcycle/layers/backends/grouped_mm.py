"""Grouped-GEMM backend: sort the executed (token, expert) pairs by expert and run every expert on its contiguous
slice of rows with one ``grouped_mm`` call per projection (offsets = cumulative group sizes), then weight the rows
and scatter-add them back. The layout of MegaBlocks (arXiv 2211.15841) and ScatterMoE (arXiv 2403.08245) on
PyTorch's own grouped GEMM, which has CPU kernels in fp32 and bf16 since torch 2.9: no padding (``grouped``
multiplies ``e·c`` rows, this backend exactly the executed pairs) and no Python loop over experts (``sorted``).

The kernel wants rows whose byte stride is a multiple of 16 (d and h multiples of 4 in fp32, of 8 in bf16),
contiguous 16-byte-aligned weights, and fp32/bf16 on CPU (bf16 on CUDA); wherever one of these fails (odd widths,
float64, a weight viewed out of a memory map) the layer runs the ``sorted`` backend instead, which computes the
same thing with one matmul per expert. At most ``FEW_PAIRS`` routed pairs (decoding) take the per-pair path of
``few_pairs``. The kernel is not autocast-aware, so under autocast its operands are cast here as autocast would.
Dimension letters: t tokens, d model width, h expert width, e experts, p executed pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .few_pairs import FEW_PAIRS, few_pairs
from .pairs import executed_pairs, scatter_to_tokens, sort_by_expert
from .registry import register_backend
from .sorted_pairs import sorted_pairs

GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)  # public from torch 2.10
KERNEL_DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.bfloat16,)}


def kernel_runs(experts, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the grouped GEMM kernel accepts these experts' shapes and weights in ``dtype`` on ``device``."""
    if GROUPED_MM is None or dtype not in KERNEL_DTYPES.get(device.type, ()):
        return False
    alignment = 16 // dtype.itemsize  # elements per 16 bytes: every row stride must be a multiple of it
    if experts.d_model % alignment or experts.d_hidden % alignment:
        return False
    weights = [w for w in (experts.w_up, experts.w_gate, experts.w_down) if w is not None]
    return all(w.is_contiguous() and w.data_ptr() % 16 == 0 for w in weights)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls run in: autocast's where it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _grouped_linear(rows, weight, bias, experts_of_rows, offsets, dtype):
    """``rows [p, in]`` through each row's expert: ``weight [e, out, in]`` (+ ``bias [e, out]``) -> ``[p, out]``."""
    out = GROUPED_MM(rows, weight.to(dtype).transpose(1, 2), offs=offsets)  # [e, in, out]: column-major, no copy
    if bias is None:
        return out
    return out + bias.to(dtype).index_select(0, experts_of_rows)  # the kernel takes no jagged bias


@register_backend("grouped_mm")
def grouped_mm(experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None):
    if indices.numel() <= FEW_PAIRS:  # decoding: sorting and offsets would cost more than the pairs
        return few_pairs(experts, x, indices, weights, mask)
    dtype = compute_dtype(x)
    if not kernel_runs(experts, x.device, dtype):
        return sorted_pairs(experts, x, indices, weights, mask)
    pairs, counts = sort_by_expert(executed_pairs(indices, weights, mask), experts.num_experts)
    if pairs.expert.numel() == 0:
        return x.new_zeros(x.shape)
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)  # [e] end of each expert's rows
    rows = x.index_select(0, pairs.token).to(dtype)  # [p, d]
    up = _grouped_linear(rows, experts.w_up, experts.b_up, pairs.expert, offsets, dtype)  # [p, h]
    gate = None
    if experts.w_gate is not None:
        gate = _grouped_linear(rows, experts.w_gate, experts.b_gate, pairs.expert, offsets, dtype)  # [p, h]
    norm_weight = norm_bias = None
    if experts.norm_weight is not None:  # one row of the hidden LayerNorm's affine per pair
        norm_weight = experts.norm_weight.index_select(0, pairs.expert)  # [p, h]
        norm_bias = experts.norm_bias.index_select(0, pairs.expert)
    hidden = experts.hidden_units(up, gate, norm_weight, norm_bias).to(dtype)  # [p, h]
    out = _grouped_linear(hidden, experts.w_down, experts.b_down, pairs.expert, offsets, dtype)  # [p, d]
    return scatter_to_tokens(out, pairs, x.shape[0])  # [t, d]
