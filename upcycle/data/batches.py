"""Batches from a dataset: collated, on a device, with augmentation drawn per example so that it does not depend
on which process or micro-batch fetches it."""

from __future__ import annotations

import torch
from torch.utils.data import default_collate


def batches(dataset, indices_per_batch, device, seed: int | None = None) -> list[dict]:
    """Collated micro-batches. With ``seed``, each example's augmentation is drawn from (seed, example index), so
    it does not depend on which process or micro-batch fetches it (1 process and N processes see the same data)."""

    def fetch(index: int) -> dict:
        if seed is not None:
            # the CPU generator only (augmentation runs on CPU): torch.manual_seed also seeds every accelerator
            # backend and costs ~1 ms per call, a quarter of a small model's training time
            torch.default_generator.manual_seed(seed * 1_000_003 + index)
        return dataset[index]

    return [to_device(default_collate([fetch(i) for i in indices]), device) for indices in indices_per_batch]


def held_out_batches(dataset, size: int, device, max_batches: int | None = None, rank: int = 0, world: int = 1):
    """Contiguous batches of ``size`` over a held-out split, at most ``max_batches``; process ``rank`` of ``world``
    takes every world-th batch. A generator, so each call walks the split afresh."""
    starts = list(range(0, len(dataset), size))[:max_batches]
    for start in starts[rank::world]:
        yield batches(dataset, [list(range(start, min(start + size, len(dataset))))], device)[0]


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
