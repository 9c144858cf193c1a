"""Matmuls of one row in bf16 on CPU run on ATen's own GEMV kernels rather than oneDNN's.

Decoding one token makes every matmul of a layer a single row, and an MoE layer makes more of them than the dense
FFN: the router and each run of experts' projections. On CPU, PyTorch sends bf16 matmuls to oneDNN, which pays a
fixed cost per call that dwarfs a small GEMV; for one row ATen's own kernel is faster, from two rows on oneDNN wins
by far (the benchmark machine: 2-core x86 with AVX-512 BF16, 2 threads, best of 5 runs of 500
calls; fp32 and fp16 matmuls are not sent to oneDNN there and do not change):

    bf16 [rows, in] x [out, in]^T     oneDNN    ATen
    1 x 576 -> 64 (a router)          17.5 µs   5.6 µs
    1 x 576 -> 1536 (an FFN)          89 µs     53 µs
    2 x 576 -> 1536                   79 µs     103 µs
    8 x 576 -> 1536                   117 µs    379 µs

The switch is PyTorch's process-wide ``torch.backends.mkldnn.enabled``, off while a layer computes such rows and
restored after. A count under a lock makes nested and concurrent holders restore it once, to what it was; while
one is held, other threads' bf16 matmuls skip oneDNN too (slower for them if they have many rows).
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.backends.mkldnn as onednn


class _OneDNNOff:
    """``torch.backends.mkldnn.enabled`` off while at least one holder is inside, restored when the last leaves."""

    def __init__(self):
        self._lock = threading.Lock()
        self._holders = 0
        self._saved = True

    def __enter__(self) -> None:
        with self._lock:
            if self._holders == 0:
                self._saved = onednn.enabled
                onednn.enabled = False
            self._holders += 1

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0:
                onednn.enabled = self._saved


_ONEDNN_OFF, _NOTHING = _OneDNNOff(), nullcontext()


def one_row_kernels(x: torch.Tensor, rows: int | None = None) -> AbstractContextManager:
    """A context in which matmuls of ``rows`` rows like ``x`` (default: ``x``'s own rows, every leading dimension
    flattened) run on the faster kernels for them (above); a no-op unless that is 1 row and the matmuls are bf16 on
    CPU (``x`` bf16, or CPU autocast to bf16)."""
    if rows is None:
        rows = x.numel() // max(x.shape[-1], 1)
    if rows != 1 or x.device.type != "cpu":
        return _NOTHING
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    return _ONEDNN_OFF if dtype == torch.bfloat16 else _NOTHING


def onednn_off() -> _OneDNNOff:
    """The shared context that keeps oneDNN off (above) for all of its body: a whole model's one-row matmuls on
    ATen's kernels, which the decode benchmark times beside the default to separate this choice from the MoE
    layers' own cost."""
    return _ONEDNN_OFF
