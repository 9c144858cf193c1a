"""Wall-clock latency of a callable: warm-up calls, then repeats, reported as the median and every sample.

Built on :func:`upcycle.bench.common.time_interleaved` (one case, so nothing to interleave) and ``median_ms``.
The median resists the odd slow repeat (a GC pause, another process). On CUDA the device is synchronised after
each call, inside the timed region, so the time is the kernels' and not just their launch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..bench.common import median_ms, time_interleaved


def time_inference(
    fn: Callable[[], object], warmup: int = 2, repeats: int = 5, *, synchronize: bool | None = None
) -> dict:
    """``{"median_ms", "samples_ms"}`` of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones.

    ``synchronize``: call ``torch.cuda.synchronize()`` after each call (default: when CUDA is available).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"time_inference needs repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    if synchronize is None:
        synchronize = torch.cuda.is_available()

    def call() -> None:
        fn()
        if synchronize:
            torch.cuda.synchronize()

    seconds = time_interleaved({"fn": call}, rounds=repeats, warmup=warmup, desc="time_inference")["fn"]
    return {"median_ms": median_ms(seconds), "samples_ms": [1000.0 * s for s in seconds]}
