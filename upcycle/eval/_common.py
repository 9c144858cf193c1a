"""What the evaluation helpers share: how a batch dict becomes model inputs, how a model is run on them, and the
eval-mode / no-grad / autocast context every measurement runs in.

Batches are dicts: ``{"x": [B, C, H, W], "labels": [B]}`` for images, ``{"input_ids": [B, T], "attention_mask":
[B, T]}`` for token models. A *forward* is either an :class:`~upcycle.adapters.Adapter` (its ``outputs``) or a
callable ``forward(model, inputs) -> output``; without one, the defaults below pick a call by the batch's keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn

from ..adapters import Adapter
from ..adapters.hf_common import is_hf_model
from ..layers import real_tokens

TARGET_KEYS = ("labels",)  # batch keys that are targets, never model inputs

Forward = Callable[[nn.Module, dict], Any]


def model_inputs(batch: dict) -> dict:
    """The batch without its targets."""
    return {key: value for key, value in batch.items() if key not in TARGET_KEYS}


def default_forward(model: nn.Module, inputs: dict) -> Any:
    """Images ``{"x"}`` -> ``model(x)``; Hugging Face models -> ``model(**inputs)``; plain token models ->
    ``model(input_ids)`` (they rarely take an attention mask); anything else -> ``model(**inputs)``."""
    if "x" in inputs and len(inputs) == 1:
        return model(inputs["x"])
    if is_hf_model(model):
        return model(**inputs)
    if "input_ids" in inputs:
        return model(inputs["input_ids"])
    return model(**inputs)


def resolve_forward(adapter_or_forward: Adapter | Forward | None) -> Forward:
    """The forward to call, run so that padding (an ``attention_mask`` in the inputs) counts in no routing."""
    if adapter_or_forward is None:
        forward = default_forward
    elif isinstance(adapter_or_forward, Adapter):
        forward = adapter_or_forward.outputs
    elif callable(adapter_or_forward):
        forward = adapter_or_forward
    else:
        raise TypeError(f"expected an Adapter or a callable forward(model, inputs), got {type(adapter_or_forward)}")
    return partial(_without_padding, forward)


def _without_padding(forward: Forward, model: nn.Module, inputs: dict) -> Any:
    with real_tokens(inputs.get("attention_mask")):
        return forward(model, inputs)


def output_tensor(output: Any) -> torch.Tensor:
    """Logits out of whatever a model returned: a tensor, an HF output with ``.logits``, or a tuple (first item)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find a logits tensor in a {type(output).__name__}; pass a forward that returns one")


def model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def to_device(batch: dict, device: torch.device | str) -> dict:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def batch_size(batch: dict) -> int:
    """Leading dimension of the first tensor in the batch (every input of one batch shares it)."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return value.shape[0]
    raise ValueError(f"the batch holds no tensor with a batch dimension (keys: {sorted(batch)})")


@contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """Eval mode and no grad inside; every submodule's own train/eval flag restored after (not just the root's:
    ``model.train(previous)`` would flip submodules a caller had frozen in eval mode)."""
    flags = [[(module, module.training) for module in model.modules()] for model in models]
    try:
        for model in models:
            model.eval()
        with torch.no_grad():
            yield
    finally:
        for model_flags in flags:
            for module, training in model_flags:
                module.training = training


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on the batch's device type when asked; a no-op context otherwise."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def limited(loader, max_batches: int | None) -> Iterator:
    for index, batch in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            return
        yield batch
