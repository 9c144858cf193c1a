"""Wall-clock latency of a callable: warm-up calls, then repeats, reported as the median and every sample.

Benchmarks time several cases with :func:`time_interleaved` (round after round, so ratios are fair on a drifting
machine); :func:`time_inference` is its one-case form.
The median resists the odd slow repeat (a GC pause, another process). On CUDA the device is synchronised after
each call, inside the timed region, so the time is the kernels' and not just their launch.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm


def time_interleaved(
    cases: dict[str, Callable[[], None]],
    rounds: int,
    warmup: int = 1,
    setup: Callable[[str], None] | None = None,
    desc: str = "timing",
) -> dict[str, list[float]]:
    """Run every case once per round, round after round, and return each case's seconds per round.

    Interleaving puts all cases under the same machine conditions, so ratios between them are fair even when the
    machine's speed drifts. The order rotates by one case each round, so that no case always runs right after the
    same other one (whose leftovers in cache, or lack of them, would otherwise favour or cost it every round).
    ``setup(name)`` runs before each call, outside the timed region.
    """
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for round_index in tqdm(range(warmup + rounds), desc=desc, unit="round", leave=False):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            fn = cases[name]
            if setup is not None:
                setup(name)
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                seconds[name].append(elapsed)
    return seconds


def median_ms(samples: list[float]) -> float:
    return 1000.0 * statistics.median(samples)


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
