"""Auto backend, the default: each call runs the backend that the layer benchmark measured fastest for its shape.

No one backend wins everywhere on a CPU (`upcycle bench layers`, results/README.md). What decides is how many rows
the average expert multiplies, ``m = pairs / e``:

- ``m`` ≥ :data:`LARGE_GROUPS`: ``sorted``. Each expert's matmul is then large enough to run near the GEMM peak on
  its own, so one plain matmul per expert beats padding (``grouped``) and the grouped kernel's backward
  (``grouped_mm``): 64 experts, 4096 tokens, training 1.45× the dense FFN's time against 1.80× and 1.68×.
- below it, inference: ``grouped``, whose padded batched matmuls cost the least fixed overhead per call (64
  experts, 512 tokens: 1.70× against 2.17× and 2.40×); one decoding token takes its per-pair path.
- below it, training: ``grouped_mm``, whose backward is three grouped GEMMs where ``grouped`` differentiates
  through a padded buffer (512 tokens, 8 experts: 1.32× against 1.47×; at 64 experts the two trade places from
  one run to the next, 2.0–2.5× each).
- a mask (dynamic-k, D2DMoE): the kept pairs count, and never ``grouped``, whose padding multiplies every expert
  by the largest group when the loads are as unbalanced as dynamic-k makes them.
- other devices (CUDA): ``grouped_mm``, which falls back to ``sorted`` where its kernel cannot run.

The thresholds and numbers are this repository's measurements on a 2-core x86 CPU (an earlier run of the layer
benchmark on 2026-12-05 than the one in results/layers.json, which moves single cells by up to ±20 % on unchanged
code: the close calls above trade places from run to run); a user who measures otherwise on their machine names a
backend instead. Dimension letters: t tokens, k choices per token, e experts.
"""

from __future__ import annotations

import torch

from .registry import get_backend, register_backend

LARGE_GROUPS = 512  # average rows per expert from which one plain matmul per expert is the fastest


def choose(num_experts: int, pairs: int, masked: bool, training: bool, device: torch.device) -> str:
    """The backend a call with ``pairs`` executed (token, expert) pairs over ``num_experts`` experts runs."""
    if device.type != "cpu":
        return "grouped_mm"
    if pairs >= LARGE_GROUPS * num_experts:
        return "sorted"
    if training:
        return "grouped_mm"
    return "sorted" if masked else "grouped"


@register_backend("auto")
def auto(experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None):
    pairs = indices.numel() if mask is None else int(mask.sum())  # one host read of the mask: free on CPU
    name = choose(experts.num_experts, pairs, mask is not None, torch.is_grad_enabled(), x.device)
    return get_backend(name)(experts, x, indices, weights, mask)
