"""Deterministic train/val/test splits: stratified by class for images, by whole file for text.

Both depend only on the inputs and the seed (numpy's PCG64 via ``default_rng``), never on global random state, so
the same seed gives the same split in every process. Index lists come back sorted.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

SPLITS = ("train", "val", "test")


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


def stratified_split(labels: np.ndarray, sizes: dict[str, int | float], seed: int) -> dict[str, np.ndarray]:
    """Split sample indices class by class; what is left of each class goes to ``"train"``.

    ``sizes`` maps the other split names to a per-class count (int) or a fraction of each class (float, rounded per
    class), e.g. ``{"val": 500}`` or ``{"val": 0.2, "test": 0.2}``. Returns split name -> sorted index array.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {name: [] for name in [*sizes, "train"]}
    for cls in np.unique(labels):  # sorted, so the draw order is fixed
        idx = rng.permutation(np.flatnonzero(labels == cls))
        start = 0
        for name, size in sizes.items():
            n = int(size) if isinstance(size, (int, np.integer)) else round(float(size) * len(idx))
            if start + n > len(idx):
                raise ValueError(f"class {cls} has {len(idx)} samples, too few for the requested split sizes")
            out[name].append(idx[start : start + n])
            start += n
        out["train"].append(idx[start:])
    return {name: np.sort(np.concatenate(parts)) for name, parts in out.items()}


def split_files(names: Iterable[str], n_val: int, n_test: int, seed: int) -> dict[str, list[str]]:
    """Assign whole files (documents) to splits: a seeded choice of ``n_val`` for val, ``n_test`` for test."""
    names = sorted(set(names))
    if n_val + n_test >= len(names):
        raise ValueError(f"{len(names)} files cannot give {n_val} val + {n_test} test files and leave any to train")
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    return {
        "val": sorted(order[:n_val]),
        "test": sorted(order[n_val : n_val + n_test]),
        "train": sorted(order[n_val + n_test :]),
    }
