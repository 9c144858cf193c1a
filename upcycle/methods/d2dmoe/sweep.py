"""D2DMoE stage 4 (Szatkowski et al., arXiv 2310.04361, §3.4): one trained model, many operating points.

Sweeping the dynamic-k threshold τ (or MoEfication's k) trades accuracy for compute without retraining. Each point
reports the held-out accuracy and the cost as a fraction of the original dense model's MACs per example (routers
included; MoE layers charged for the (token, expert) pairs they executed, averaged over ``mac_examples`` held-out
examples because the executed pairs vary per input). Wall-clock: the converted model's FFN layers against the dense
model's FFN layers on the same inputs (each fed what it sees inside its own model), and the whole models.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from ...adapters import adapter_of
from ...eval import count_macs, time_inference
from ...eval._common import default_forward, model_inputs
from ...eval.held_out import HeldOut


def macs_per_example(model: nn.Module, held_out: HeldOut, examples: int) -> float:
    """MACs per example averaged over the first ``examples`` held-out examples (batches of 64)."""
    total = count = 0.0
    for batch in held_out.batches(max(1, -(-examples // held_out.batch_size))):
        size = next(iter(batch.values())).shape[0]
        total += count_macs(model, batch).total * size
        count += size
    return total / count


def sweep(model: nn.Module, dense_macs: float, points: list, apply: Callable[[nn.Module, object], None],
          held_out: dict[str, HeldOut], mac_examples: int = 256, desc: str = "sweep") -> list[dict]:  # fmt: skip
    """``apply(model, point)`` for every point, then the metric on each held-out split and the MACs fraction."""
    rows = []
    for point in tqdm(points, desc=desc, unit="point", leave=False):
        apply(model, point)
        row = {"point": point}
        for split, data in held_out.items():
            row[split] = data.metric(model)
        first = next(iter(held_out.values()))
        row["flops_fraction"] = macs_per_example(model, first, mac_examples) / dense_macs
        rows.append(row)
    return rows


def lowest_fraction_within(rows: list[dict], reference: float, split: str, drop: float = 0.01) -> dict | None:
    """The cheapest point whose ``split`` metric is at least ``reference - drop`` (None: no point qualifies)."""
    eligible = [row for row in rows if row[split] >= reference - drop - 1e-12]
    return min(eligible, key=lambda row: row["flops_fraction"]) if eligible else None


# ---- wall-clock --------------------------------------------------------------------------------------------------
def _ffn_modules(model: nn.Module) -> list[nn.Module]:
    """The modules at the model's FFN sites (dense FFNs, or the MoE wrappers installed there)."""
    return [model.get_submodule(site.name) for site in adapter_of(model).ffn_sites(model)]


def _ffn_computations(model: nn.Module) -> list[nn.Module]:
    """Each FFN site's whole computation, callable on the site's input: the site's module, or where a family splits
    its FFN over modules (BERT: ``intermediate``, then ``output.dense``) all of it, as the MoE there stands for."""
    adapter = adapter_of(model)
    return [adapter.dense_counterpart(model, site.name) for site in adapter.ffn_sites(model)]


@torch.no_grad()
def _captured_inputs(model: nn.Module, modules: list[nn.Module], batch: dict) -> list[tuple]:
    """The positional inputs each module receives during one forward on ``batch``."""
    captured: list[tuple | None] = [None] * len(modules)

    def keep(index, module, args):
        captured[index] = args

    handles = [m.register_forward_pre_hook(partial(keep, i)) for i, m in enumerate(modules)]
    try:
        model.eval()
        _forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _forward(model: nn.Module, batch: dict):
    return default_forward(model, model_inputs(batch))


def ffn_wallclock_ms(model: nn.Module, batch: dict, repeats: int = 7) -> float:
    """Median ms of running every FFN site's whole computation of ``model`` on the inputs it sees for ``batch``."""
    inputs = _captured_inputs(model, _ffn_modules(model), batch)
    modules = _ffn_computations(model)

    @torch.no_grad()
    def run():
        for module, args in zip(modules, inputs, strict=True):
            module(*args)

    return time_inference(run, warmup=2, repeats=repeats)["median_ms"]


def model_wallclock_ms(model: nn.Module, batch: dict, repeats: int = 7) -> float:
    model.eval()
    return time_inference(torch.no_grad()(partial(_forward, model, batch)), warmup=2, repeats=repeats)["median_ms"]


def first_batch(held_out: HeldOut) -> dict:
    return next(iter(held_out.batches(1)))
