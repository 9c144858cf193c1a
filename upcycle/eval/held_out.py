"""A held-out split as evaluation batches for a model's task: the same dataset options and tokenizer as training,
an optional evenly strided subset, and the task's metric (accuracy or perplexity) on it."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.data import Subset

from ..adapters import adapter_of
from ..config import TrainConfig
from ..data.batches import held_out_batches
from .tasks import make_task

BATCH = 64
LOGIT_BUDGET = 2**27  # elements of one batch's [b, t, V] logits (512 MB in fp32): big vocabularies, smaller batches


class HeldOut:
    """The held-out batches of one dataset split for ``model``'s task (built once, walked for every point).

    ``examples``: an evenly strided subset of the split, not its first examples: splits may be ordered (the text
    mixture holds one domain after another), and a prefix would then measure one class.
    """

    def __init__(self, model: nn.Module, data: str, split: str, examples: int | None = None, seq_len: int = 128,
                 data_options: dict | None = None):  # fmt: skip
        config = TrainConfig(data=data, steps=1, augment=False, seq_len=seq_len, data_options=data_options or {})
        self.task = make_task(model, adapter_of(model), config)
        self.dataset = self.task.dataset(split)
        vocab = getattr(self.task, "vocab_size", None)  # language models: the logits dominate an evaluation's memory
        self.batch_size = BATCH if vocab is None else max(1, min(BATCH, LOGIT_BUDGET // (seq_len * vocab)))
        if examples is not None and examples < len(self.dataset):
            chosen = torch.linspace(0, len(self.dataset) - 1, examples).round().long().unique().tolist()
            self.dataset = Subset(self.dataset, chosen)

    def batches(self, max_batches: int | None = None) -> Iterable[dict]:
        return held_out_batches(self.dataset, self.batch_size, "cpu", max_batches)

    def metric(self, model: nn.Module) -> float:
        was_training = model.training
        model.eval()
        try:
            return self.task.evaluate(model, self.batches())[self.task.metric]
        finally:
            model.train(was_training)
