"""How the routers of a model spread tokens over experts, aggregated over batches, and a heatmap of it.

``collect_routing_stats`` runs batches and aggregates :func:`~upcycle.layers.routing_statistics` of every MoE
layer call (a forward hook on each layer, so a layer called twice per forward counts twice). Averages are
weighted by the tokens of each call, so a short last batch does not weigh like a full one. ``dead_experts`` is
judged on the aggregated load with the rule of ``routing_statistics``: sparse routing, no pair at all over the
whole run; slot routing, below 1% of a uniform share.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..adapters import Adapter
from ..atomic import atomic_write_bytes
from ..layers import MoE, moe_layers, routing_statistics
from ._common import Forward, autocast, evaluating, limited, model_device, model_inputs, resolve_forward, to_device

AVERAGED = ("entropy", "dropped_pairs", "dropped_tokens")  # per-call statistics averaged over tokens


def _record(calls: dict[str, list[dict]], name: str, moe: MoE, *_) -> None:
    stats = routing_statistics(moe.last_routing)
    stats["kind"] = "sparse" if moe.last_routing.is_sparse else "slots"
    calls[name].append(stats)


def aggregate(calls: list[dict]) -> dict:
    """Token-weighted mean of the per-call statistics of one layer; dead experts judged on the mean load."""
    tokens = sum(call["tokens"] for call in calls)
    weights = [call["tokens"] / max(tokens, 1) for call in calls]
    load = sum(torch.tensor(call["load"], dtype=torch.float64) * w for call, w in zip(calls, weights, strict=True))
    experts = load.numel()
    sparse = calls[0]["kind"] == "sparse"
    dead = int((load == 0).sum()) if sparse else int((load < 0.01 / experts).sum())
    summary = {key: sum(call[key] * w for call, w in zip(calls, weights, strict=True)) for key in AVERAGED}
    return {
        "load": load.tolist(),
        **summary,
        "max_entropy": calls[0]["max_entropy"],
        "dead_experts": dead,
        "tokens": tokens,
        "calls": len(calls),
        "kind": calls[0]["kind"],
    }


@torch.no_grad()
def collect_routing_stats(
    model: nn.Module,
    loader,
    forward: Adapter | Forward | None = None,
    max_batches: int | None = None,
    *,
    device: torch.device | str | None = None,
    bf16: bool = False,
) -> dict[str, dict]:
    """``{moe_layer_name: {load [e], entropy, max_entropy, dead_experts, dropped_pairs, dropped_tokens, tokens,
    calls, kind}}`` over up to ``max_batches`` batches, in eval mode (modes restored). Layers that never ran are
    left out."""
    run = resolve_forward(forward)
    device = torch.device(device) if device is not None else model_device(model)
    calls: dict[str, list[dict]] = defaultdict(list)
    handles = [moe.register_forward_hook(partial(_record, calls, name)) for name, moe in moe_layers(model)]
    try:
        with evaluating(model):
            for batch in limited(loader, max_batches):
                with autocast(device, bf16):
                    run(model, to_device(model_inputs(batch), device))
    finally:
        for handle in handles:
            handle.remove()
    return {name: aggregate(layer_calls) for name, layer_calls in calls.items()}


def load_matrix(stats: dict[str, dict]) -> list[list[float]]:
    """Rows = layers, columns = experts; NaN pads layers with fewer experts (shown blank)."""
    width = max(len(layer["load"]) for layer in stats.values())
    return [layer["load"] + [math.nan] * (width - len(layer["load"])) for layer in stats.values()]


def plot_expert_load(stats: dict[str, dict], path: str | Path, title: str = "Expert load") -> Path:
    """Heatmap of each layer's per-expert load (share of its routed tokens) to ``path`` (PNG, or the format its
    suffix names), written atomically. The colour scale starts at 0; a uniform router shows 1/e everywhere."""
    if not stats:
        raise ValueError("plot_expert_load: no routing statistics (did the loader run any MoE layer?)")
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg canvas: no display, no global pyplot state
    from matplotlib.figure import Figure

    matrix = load_matrix(stats)
    layers, experts = len(matrix), len(matrix[0])
    figure = Figure(figsize=(min(5 + 0.4 * experts, 16), min(2 + 0.35 * layers, 12)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
    figure.colorbar(image, ax=axes, label="share of routed tokens")
    axes.set_xlabel("expert")
    axes.set_ylabel("MoE layer")
    axes.set_xticks(range(experts))
    axes.set_yticks(range(layers), labels=list(stats), fontsize=7)
    axes.set_title(f"{title}\n(uniform = 1/{experts})", fontsize=10)  # two lines: narrow plots of few experts
    buffer = io.BytesIO()
    suffix = Path(path).suffix.lstrip(".").lower() or "png"
    figure.savefig(buffer, format=suffix, dpi=120)
    atomic_write_bytes(path, buffer.getvalue())  # temp file in the same folder, then os.replace
    return Path(path)
