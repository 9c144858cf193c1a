"""A resumable, distributed batch sampler: the data position is part of the checkpoint.

Every epoch is one permutation of the training split drawn from ``(seed, epoch)``. Optimizer step s of an epoch
reads the s-th block of ``global_batch`` indices; process r of W takes its contiguous slice of that block, and each
micro-step of gradient accumulation a further slice. So 1 process with batch B and 2 processes with B/2 each see
exactly the same examples per step, and resuming at (epoch, step) continues the same sequence.
"""

from __future__ import annotations

import torch


class ResumableBatchSampler:
    def __init__(self, num_examples: int, global_batch: int, seed: int, rank: int = 0, world: int = 1,
                 grad_accum: int = 1):  # fmt: skip
        if global_batch > num_examples:
            raise ValueError(f"batch size {global_batch} is larger than the training split ({num_examples} examples)")
        if global_batch % (world * grad_accum):
            raise ValueError(
                f"batch size {global_batch} must divide evenly over {world} processes × {grad_accum} accumulation steps"
            )
        self.num_examples, self.global_batch, self.seed = num_examples, global_batch, seed
        self.rank, self.world, self.grad_accum = rank, world, grad_accum
        self.steps_per_epoch = num_examples // global_batch  # drop the ragged end: every step has a full batch
        self.epoch, self.step_in_epoch = 0, 0
        self._order: torch.Tensor | None = None

    @property
    def micro_batch(self) -> int:
        return self.global_batch // (self.world * self.grad_accum)

    def _permutation(self) -> torch.Tensor:
        if self._order is None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(self.num_examples, generator=generator)
        return self._order

    def next_step(self) -> list[list[int]]:
        """This process's micro-batches (lists of example indices) for the next optimizer step."""
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch, self._order = self.epoch + 1, 0, None
        start = self.step_in_epoch * self.global_batch
        block = self._permutation()[start : start + self.global_batch]  # [B] global
        local = block.view(self.world, -1)[self.rank]  # [B / W]
        self.step_in_epoch += 1
        return [chunk.tolist() for chunk in local.view(self.grad_accum, -1)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step_in_epoch, self._order = int(state["epoch"]), int(state["step_in_epoch"]), None
