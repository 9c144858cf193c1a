"""What every benchmark shares: interleaved timing, machine description, and the results file."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..atomic import atomic_write_text


def time_interleaved(
    cases: dict[str, Callable[[], None]],
    rounds: int,
    warmup: int = 1,
    setup: Callable[[str], None] | None = None,
    desc: str = "timing",
) -> dict[str, list[float]]:
    """Run every case once per round, round after round, and return each case's seconds per round.

    Interleaving puts all cases under the same machine conditions, so ratios between them are fair even when the
    machine's speed drifts. ``setup(name)`` runs before each call, outside the timed region.
    """
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for round_index in tqdm(range(warmup + rounds), desc=desc, unit="round", leave=False):
        for name, fn in cases.items():
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


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def command_line() -> str:
    return "upcycle " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("upcycle") else " ".join(sys.argv)


def provenance() -> dict:
    """How and where a result was produced: the command, the machine, the date (UTC)."""
    return {
        "command": command_line(),
        "machine": machine_info(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(out_dir: str | os.PathLike, name: str, summary: dict, rows: list[dict], **extra) -> Path:
    """Write ``<out_dir>/<name>.json`` atomically with the shared layout: summary, rows, command, machine."""
    payload = {"summary": summary, "rows": rows, **provenance(), **extra}
    path = Path(out_dir) / f"{name}.json"
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    return path
