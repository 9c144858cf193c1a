"""Quality metrics over a DataLoader of dict batches: top-1 accuracy, causal-LM perplexity, embedding fidelity.

Every metric runs in eval mode under ``torch.no_grad()`` and restores each module's previous train/eval flag.
``bf16=True`` runs the forward under bf16 autocast on the batch's device (losses and similarities are computed
in fp32). Batches move to ``device`` (default: the device of the model's first parameter); the model does not.
Averages are over all examples (accuracy, fidelity) or all predicted tokens (perplexity), not over batches, so
a short last batch weighs what it holds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import Adapter
from ..adapters.hf_common import is_hf_model
from ._common import (
    Forward,
    autocast,
    default_forward,
    evaluating,
    limited,
    model_device,
    model_inputs,
    output_tensor,
    resolve_forward,
    to_device,
)

IGNORE_INDEX = -100  # target value that contributes no loss (Hugging Face convention)


def _device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else model_device(model)


@torch.no_grad()
def accuracy(
    model: nn.Module,
    loader,
    adapter_or_forward: Adapter | Forward | None = None,
    device: torch.device | str | None = None,
    *,
    bf16: bool = False,
    max_batches: int | None = None,
) -> float:
    """Top-1 accuracy over batches ``{"x": [B, C, H, W], "labels": [B]}`` (logits ``[B, classes]``)."""
    forward, device = resolve_forward(adapter_or_forward), _device(model, device)
    correct = seen = 0
    with evaluating(model):
        for batch in limited(loader, max_batches):
            batch = to_device(batch, device)
            with autocast(device, bf16):
                logits = output_tensor(forward(model, model_inputs(batch)))  # [B, classes]
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            seen += batch["labels"].numel()
    if seen == 0:
        raise ValueError("accuracy: the loader yielded no examples")
    return correct / seen


def next_token_targets(batch: dict) -> torch.Tensor:
    """``[B, T]`` targets: ``labels`` if given (IGNORE_INDEX where ignored), else ``input_ids``; padding (mask 0)
    ignored. Position t is predicted by the logits at t - 1."""
    targets = batch.get("labels", batch["input_ids"]).clone()
    mask = batch.get("attention_mask")
    if mask is not None:
        targets[mask == 0] = IGNORE_INDEX
    return targets


@torch.no_grad()
def perplexity(
    model: nn.Module,
    loader,
    adapter_or_forward: Adapter | Forward | None = None,
    device: torch.device | str | None = None,
    *,
    bf16: bool = False,
    max_batches: int | None = None,
) -> float:
    """exp(mean next-token cross-entropy) over every predicted token of batches ``{"input_ids": [B, T]}``.

    Works with models returning ``.logits`` (Hugging Face) or a logits tensor ``[B, T, vocab]``.
    """
    forward, device = resolve_forward(adapter_or_forward), _device(model, device)
    nll, tokens = 0.0, 0
    with evaluating(model):
        for batch in limited(loader, max_batches):
            batch = to_device(batch, device)
            with autocast(device, bf16):
                logits = output_tensor(forward(model, model_inputs(batch)))  # [B, T, vocab]
            targets = next_token_targets(batch)[:, 1:]  # [B, T-1]: token t+1 is predicted at t
            predicted = logits[:, :-1].float()  # [B, T-1, vocab]
            nll += float(F.cross_entropy(predicted.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                         reduction="sum"))  # fmt: skip
            tokens += int((targets != IGNORE_INDEX).sum())
    if tokens == 0:
        raise ValueError("perplexity: the loader yielded no predicted tokens (sequences need length >= 2)")
    return math.exp(nll / tokens)


def representation(model: nn.Module, inputs: dict, forward: Forward | None = None) -> torch.Tensor:
    """What fidelity compares: ``forward``'s output if given; else the last hidden state (Hugging Face:
    ``last_hidden_state`` or the last of ``hidden_states``; timm: ``forward_features``); else the outputs."""
    if forward is not None:
        return output_tensor(forward(model, inputs))
    if is_hf_model(model):
        out = model(**inputs, output_hidden_states=True)
        hidden = getattr(out, "last_hidden_state", None)
        return hidden if hidden is not None else out.hidden_states[-1]
    if hasattr(model, "forward_features") and "x" in inputs:
        return model.forward_features(inputs["x"])
    return output_tensor(default_forward(model, inputs))


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, D]`` from ``[B, D]``, tokens ``[B, N, D]`` (mean over the unmasked tokens) or a channels-first
    grid ``[B, C, H, W]`` (mean over positions)."""
    hidden = hidden.float()
    if hidden.ndim == 2:
        return hidden
    if hidden.ndim == 4:
        return hidden.mean((2, 3))
    if hidden.ndim != 3:
        raise ValueError(f"cannot mean-pool a representation of shape {tuple(hidden.shape)}")
    if attention_mask is None or attention_mask.shape != hidden.shape[:2]:
        return hidden.mean(1)
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # [B, N, 1]
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)


@torch.no_grad()
def embedding_fidelity(
    model: nn.Module,
    reference: nn.Module,
    loader,
    forward: Adapter | Forward | None = None,
    device: torch.device | str | None = None,
    *,
    bf16: bool = False,
    max_batches: int | None = None,
) -> float:
    """Mean over examples of the cosine similarity between ``model``'s and ``reference``'s mean-pooled
    representations of the same batch (1.0: same directions; a converted model should stay close to its source)."""
    forward = None if forward is None else resolve_forward(forward)
    total, seen = 0.0, 0
    with evaluating(model, reference):
        for batch in limited(loader, max_batches):
            pooled = []
            for net in (model, reference):
                net_device = _device(net, device)
                on_device = to_device(model_inputs(batch), net_device)
                with autocast(net_device, bf16):
                    hidden = representation(net, on_device, forward)
                pooled.append(mean_pool(hidden, on_device.get("attention_mask")).cpu())  # [B, D]
            total += float(F.cosine_similarity(pooled[0], pooled[1], dim=-1).sum())
            seen += pooled[0].shape[0]
    if seen == 0:
        raise ValueError("embedding_fidelity: the loader yielded no examples")
    return total / seen
