"""``upcycle eval``: one model on one held-out split — its task metric, MACs per sample (MoE layers charged for
what their routing executed), parameters total / active, and for MoE models the routing statistics with a
per-layer expert-load heatmap."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

from torch import nn

from ..adapters import adapter_of
from ..atomic import atomic_write_text
from ..layers import moe_layers
from .flops import count_macs
from .params import count_parameters
from .routing_report import collect_routing_stats, plot_expert_load


def evaluate_model(
    model: nn.Module,
    data: str,
    split: str = "test",
    batch_size: int = 64,
    max_batches: int | None = None,
    seq_len: int = 128,
    out: str | Path | None = None,
    task: str | None = None,
    data_options: dict | None = None,
) -> dict:
    """``model`` on the held-out ``split`` of ``data`` (a built-in name or the user's SPEC, read with
    ``data_options``; ``task`` overrides the family's); with ``out``, ``eval.json`` and the expert-load heatmap."""
    from ..config import TrainConfig
    from ..data.batches import held_out_batches
    from .tasks import make_task

    if split not in ("val", "test"):
        raise ValueError(f"evaluate on a held-out split (val or test), not {split!r}")
    adapter = adapter_of(model)
    config = TrainConfig(data=data, steps=1, augment=False, seq_len=seq_len, task=task,
                         data_options=data_options or {})  # fmt: skip
    task = make_task(model, adapter, config)
    dataset = task.dataset(split)

    def loader():
        return held_out_batches(dataset, batch_size, "cpu", max_batches)

    model.eval()
    batch_count = -(-len(dataset) // batch_size) if max_batches is None else max_batches
    result = {"data": data, "split": split, "examples": min(len(dataset), batch_count * batch_size)}
    result.update(task.evaluate(model, loader()))
    first = next(iter(loader()))
    inputs = {k: v[:8] for k, v in first.items() if k != "labels"}
    result["macs_per_sample"] = count_macs(model, inputs).total
    result["parameters"] = count_parameters(model)
    if moe_layers(model):
        stats = collect_routing_stats(model, islice(loader(), 8))
        result["routing"] = stats
        if out is not None:
            result["expert_load_png"] = str(plot_expert_load(stats, Path(out) / "expert_load.png"))
    if out is not None:
        atomic_write_text(Path(out) / "eval.json", json.dumps(result, indent=2, default=float) + "\n")
    return result
