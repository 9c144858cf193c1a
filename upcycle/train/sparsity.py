"""Activation-sparsity penalty on FFN activations (D2DMoE, arXiv 2310.04361 §3.1): forward hooks on each dense
FFN's activation module collect its output; the penalty is the squared Hoyer (or L1) per token, averaged over
tokens, then over layers, scaled by a coefficient that ramps linearly from 0 to full strength over the first part
of training.

Layers average by group (``per_group``, as the authors' ``sparse_finetuning.py`` does): the mean over the FFNs plus
the mean over the attention-projection MLPs that D2DMoE's §3.4 adds (four per block). One mean over all of them
(``pooled``) would give each block's FFN a fifth of the weight it has without the projections.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ..layers.losses import hoyer_sparsity, l1_sparsity
from ..layers.real_tokens import real_rows


def activation_modules(model: nn.Module, adapter) -> dict[str, nn.Module]:
    """Site name -> the activation module of every dense FFN the adapter knows (MoE layers have none)."""
    modules = {site.name: adapter.activation_module(model, site) for site in adapter.ffn_sites(model)}
    return {name: module for name, module in modules.items() if module is not None}


def site_group(name: str) -> str:
    """``"attention"`` for an attention-projection MLP site (``blocks.3.attn.qkv.q``), else ``"ffn"``."""
    return "attention" if ".attn." in f".{name}." else "ffn"


class SparsityPenalty:
    def __init__(self, model: nn.Module, adapter, kind: str, mean: str = "per_group"):
        if mean not in ("per_group", "pooled"):
            raise ValueError(f"sparsity mean must be per_group or pooled, got {mean!r}")
        self.penalty = hoyer_sparsity if kind == "hoyer" else l1_sparsity
        self.mean = mean
        self.outputs: list[tuple[str, torch.Tensor]] = []  # (group, activations) in forward order
        self.modules = activation_modules(model, adapter)
        if not self.modules:
            raise ValueError("activation sparsity needs dense FFNs with an activation module; this model has none")
        self.handles = [m.register_forward_hook(partial(self._keep, site_group(name)))
                        for name, m in self.modules.items()]  # fmt: skip

    def _keep(self, group: str, module, inputs, output) -> None:
        real = real_rows(output)  # padding's activations count in no penalty
        self.outputs.append((group, output if real is None else output.reshape(real.numel(), -1)[real]))

    def take(self) -> tuple[torch.Tensor, float]:
        """(penalty, share of exactly-zero activations) of the forward pass just run; clears what was kept."""
        kept, self.outputs = self.outputs, []
        if not kept:
            return torch.zeros(()), float("nan")
        outputs = [a for _, a in kept]
        if self.mean == "pooled":
            penalty = torch.stack([self.penalty(a) for a in outputs]).mean()
        else:  # each group's mean, summed: the FFN term keeps its weight when projection MLPs join
            groups = {group for group, _ in kept}
            penalty = sum(torch.stack([self.penalty(a) for g, a in kept if g == group]).mean() for group in groups)
        with torch.no_grad():
            zeros = sum(int((a == 0).sum()) for a in outputs) / sum(a.numel() for a in outputs)
        return penalty, zeros

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def ramp(step: int, total: int, fraction: float) -> float:
    """Linear ramp 0 -> 1 over the first ``fraction`` of ``total`` steps."""
    return 1.0 if fraction == 0 else min(1.0, (step + 1) / max(1.0, fraction * total))
