"""How and where a result was produced (the command, the machine, the date), and the results file that carries it."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from .atomic import atomic_write_text

# OpenMP settings change small-op latency a lot (a passive wait policy puts threads to sleep between ops), so a
# timing is read with them
THREADING_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "GOMP_SPINCOUNT")


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "threading_env": {name: os.environ[name] for name in THREADING_VARIABLES if name in os.environ},
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
