"""What ``upcycle bench upcycling`` measures of each column: held-out perplexity per text domain, forward MACs per
token (routed experts charged for what their routing ran, so "equal FLOPs" is measured, not assumed), parameters,
and the expert-load statistics of every MoE layer.

Load statistics per layer (:func:`~upcycle.eval.collect_routing_stats` over the validation batches of every domain):
``load_entropy`` the entropy of the share of routed assignments each expert receives over log e (1 balanced, 0 every
token on one expert), ``max_load_share`` the largest expert's share (1/e balanced), ``dead_experts`` experts that
received nothing. Shared (always-on) experts are not routed and are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ..eval import collect_routing_stats, count_macs, count_parameters
from ..eval.held_out import HeldOut


class DomainHeldOut:
    """One split of each ``text_mixture`` domain, ``sequences`` evenly strided sequences each (built once from the
    dense model's tokenizer, then walked for every column and every point of its curve)."""

    def __init__(self, model: nn.Module, domains: Iterable[str], split: str, sequences: int, seq_len: int):
        self.sets = {domain: HeldOut(model, "text_mixture", split, sequences, seq_len, data_options={"domain": domain})
                     for domain in domains}  # fmt: skip

    def perplexity(self, model: nn.Module) -> dict[str, float]:
        """``{domain: perplexity, ..., "average": their geometric mean}`` (the mean of the domains' losses)."""
        result = {domain: held_out.metric(model) for domain, held_out in self.sets.items()}
        result["average"] = math.exp(sum(math.log(v) for v in result.values()) / len(result))
        return result

    def batches(self, per_domain: int | None = None) -> Iterable[dict]:
        for held_out in self.sets.values():
            yield from held_out.batches(per_domain)

    def example_ids(self, sequences: int) -> torch.Tensor:
        """The first ``sequences`` held-out sequences of the first domain ``[n, seq_len]``."""
        return next(iter(next(iter(self.sets.values())).batches(1)))["input_ids"][:sequences]


def load_statistics(model: nn.Module, held_out: DomainHeldOut, bf16: bool) -> dict | None:
    """Per MoE layer: ``load``, ``load_entropy``, ``max_load_share``, ``dead_experts``; and over layers: the mean load
    entropy, the largest max share and the dead experts in all. None for a dense model."""
    stats = collect_routing_stats(model, held_out.batches(), bf16=bf16)
    if not stats:
        return None
    layers = {}
    for name, layer in stats.items():
        load = torch.tensor(layer["load"], dtype=torch.float64)
        experts = load.numel()
        entropy = float(-(load * load.clamp_min(1e-12).log()).sum() / math.log(experts)) if experts > 1 else 1.0
        layers[name] = {"load": [round(v, 4) for v in layer["load"]], "load_entropy": round(entropy, 4),
                        "max_load_share": round(float(load.max()), 4),
                        "dead_experts": layer["dead_experts"]}  # fmt: skip
    return {
        "mean_load_entropy": round(sum(v["load_entropy"] for v in layers.values()) / len(layers), 4),
        "max_load_share": max(v["max_load_share"] for v in layers.values()),
        "uniform_share": round(1 / len(next(iter(layers.values()))["load"]), 4),
        "dead_experts": sum(v["dead_experts"] for v in layers.values()),
        "layers": layers,
    }


@torch.no_grad()
def costs(model: nn.Module, ids: torch.Tensor) -> dict:
    """Parameters (total, active per token) and forward MACs per token on ``ids [b, t]``."""
    params = count_parameters(model)
    return {
        "params_total": params["total"],
        "params_active": params["active"],
        "macs_per_token": count_macs(model, {"input_ids": ids}).total / ids.shape[1],
    }
