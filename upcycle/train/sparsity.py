"""Activation-sparsity penalty on FFN activations (D2DMoE, arXiv 2310.04361 §3.1): forward hooks on each dense
FFN's activation module collect its output; the penalty is the squared Hoyer (or L1) averaged over layers,
scaled by a coefficient that ramps linearly from 0 to full strength over the first part of training.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers.losses import hoyer_sparsity, l1_sparsity
from ..layers.real_tokens import real_rows


def activation_modules(model: nn.Module, adapter) -> dict[str, nn.Module]:
    """Site name -> the activation module of every dense FFN the adapter knows (MoE layers have none)."""
    modules = {site.name: adapter.activation_module(model, site) for site in adapter.ffn_sites(model)}
    return {name: module for name, module in modules.items() if module is not None}


class SparsityPenalty:
    def __init__(self, model: nn.Module, adapter, kind: str):
        self.penalty = hoyer_sparsity if kind == "hoyer" else l1_sparsity
        self.outputs: list[torch.Tensor] = []
        self.modules = activation_modules(model, adapter)
        if not self.modules:
            raise ValueError("activation sparsity needs dense FFNs with an activation module; this model has none")
        self.handles = [m.register_forward_hook(self._keep) for m in self.modules.values()]

    def _keep(self, module, inputs, output) -> None:
        real = real_rows(output)  # padding's activations count in no penalty
        self.outputs.append(output if real is None else output.reshape(real.numel(), -1)[real])

    def take(self) -> tuple[torch.Tensor, float]:
        """(penalty, share of exactly-zero activations) of the forward pass just run; clears what was kept."""
        outputs, self.outputs = self.outputs, []
        if not outputs:
            return torch.zeros(()), float("nan")
        penalty = torch.stack([self.penalty(a) for a in outputs]).mean()
        with torch.no_grad():
            zeros = sum(int((a == 0).sum()) for a in outputs) / sum(a.numel() for a in outputs)
        return penalty, zeros

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def ramp(step: int, total: int, fraction: float) -> float:
    """Linear ramp 0 -> 1 over the first ``fraction`` of ``total`` steps."""
    return 1.0 if fraction == 0 else min(1.0, (step + 1) / max(1.0, fraction * total))
