"""The record of a conversion: which adapter, how to rebuild the dense skeleton, the resolved recipe and each MoE
layer's structure. ``upcycle.convert`` writes it, ``upcycle.save`` stores it in config.json, ``upcycle.load`` rebuilds
the model from it."""

from __future__ import annotations

import json

from torch import nn

from .adapters import find_adapter
from .layers import moe_layers

RECORD_VERSION = 1


def ensure_record(model: nn.Module) -> dict:
    """The model's conversion record; a dense model gets one with no MoE layers, so it saves and loads the same way."""
    record = getattr(model, "upcycle_record", None)
    if record is None:
        adapter = find_adapter(model)
        record = json_pure({
            "version": RECORD_VERSION, "adapter": adapter.name, "source": adapter.describe(model),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "convert": None, "layers": {},
        })  # fmt: skip
        model.upcycle_record = record
    return record


def sync_router_specs(model: nn.Module) -> None:
    """Refresh each recorded layer's router spec from the live router: options set after conversion (the dynamic-k
    ``tau``, ``top_k``, see ``set_tau`` / ``set_top_k``) are part of what a saved model must reload with."""
    record = getattr(model, "upcycle_record", None) or {}
    sites = record.get("layers", {})
    for name, layer in moe_layers(model):
        site = next((site for site in sites if name == site or name.startswith(f"{site}.")), None)
        if site is not None:
            sites[site]["router"] = json_pure(layer.router.spec())


def json_pure(record: dict) -> dict:
    """The record exactly as it reads back from config.json (tuples become lists), or a clear error."""
    try:
        return json.loads(json.dumps(record))
    except TypeError as error:
        raise ValueError(f"the model description is not plain data ({error}); pass JSON-friendly kwargs") from None
