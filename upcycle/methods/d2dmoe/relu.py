"""D2DMoE stage 1, the activation (Szatkowski et al., arXiv 2310.04361, §3.1): every FFN's activation becomes ReLU
(gated FFNs: the gate branch), so a hidden unit that does not fire contributes exactly zero, and the sparsity the
Hoyer penalty then enforces can be measured as the share of exact zeros.

The swap also changes what the model records about itself, so a saved ReLU model rebuilds as one (the adapter
knows where: creation arguments, a config's activation name).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
from torch import nn

from ...adapters import find_adapter
from ...record import record_of
from ...train.sparsity import activation_modules


def swap_to_relu(model: nn.Module) -> int:
    """Replace the activation module of every dense FFN of ``model`` by ``nn.ReLU``, in place; returns how many.

    MoE layers (already converted FFNs) are left alone: their experts carry their own activation.
    """
    adapter = find_adapter(model)
    swapped = adapter.swap_activations_to_relu(model)  # and records it, so the model rebuilds with ReLU
    if swapped == 0:
        raise ValueError("no dense FFN activation to swap: the model has no dense FFNs the adapter can find")
    record = record_of(model)
    if record is not None and record.adapter is not None:  # converted or loaded: it must rebuild the ReLU model now
        record.source = adapter.describe(model)
    return swapped


@torch.no_grad()
def activation_sparsity(model: nn.Module, batches: Iterable[dict]) -> dict[str, float]:
    """Share of exactly-zero FFN activations per dense FFN site over ``batches`` (model inputs), and ``"mean"``."""
    adapter = find_adapter(model)
    modules = activation_modules(model, adapter)
    zeros = {name: [0, 0] for name in modules}  # [zero activations, activations]
    handles = [module.register_forward_hook(partial(_count_zeros, zeros[name])) for name, module in modules.items()]
    if not handles:
        raise ValueError("the model has no dense FFN activations to measure")
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            adapter.outputs(model, {k: v for k, v in batch.items() if k != "labels"})
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    shares = {name: counted / max(total, 1) for name, (counted, total) in zeros.items()}
    shares["mean"] = sum(shares.values()) / len(shares)
    return shares


def _count_zeros(tally: list[int], module, inputs, output: torch.Tensor) -> None:
    tally[0] += int((output == 0).sum())
    tally[1] += output.numel()
