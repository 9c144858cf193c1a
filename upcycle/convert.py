"""``upcycle.convert``: a dense model -> the same model with MoE layers in place of (some of) its FFNs.

The adapter finds and reads the FFNs, the registered method turns each into an MoE layer, the adapter installs
it. The result carries ``upcycle_record``: the adapter, how to rebuild the dense skeleton, the resolved recipe and
each MoE layer's structure, which is all ``upcycle.save`` / ``upcycle.load`` need.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import Adapter, find_adapter, get_adapter
from .config import RUNTIME_FIELDS, ConvertConfig, LayerSelection, load_convert_config
from .errors import check_finite
from .layers import describe_moe, moe_layers
from .recycling import get_method

RECORD_VERSION = 1


def select_layers(count: int, selection: LayerSelection) -> list[int]:
    """Indices of the FFNs to convert among ``count``: all, every other (1, 3, 5, ...), the last half, or a list."""
    if selection == "all":
        return list(range(count))
    if selection == "every_other":
        return list(range(1, count, 2))  # odd layers, as Switch / GShard interleave MoE with dense layers
    if selection == "last_half":
        return list(range(count // 2, count))
    out_of_range = [i for i in selection if i >= count]
    if out_of_range:
        raise ValueError(f"layers {out_of_range} do not exist: the model has {count} FFNs (indices 0..{count - 1})")
    return sorted(selection)


def convert(
    model: nn.Module,
    method: str | None = None,
    config: ConvertConfig | dict | str | Path | None = None,
    *,
    adapter: Adapter | str | None = None,
    inplace: bool = False,
    progress: bool = True,
    **overrides,
) -> nn.Module:
    """Convert ``model``'s FFNs into MoE layers.

    ``config`` is a :class:`ConvertConfig`, a dict or a YAML path; ``method`` and keyword ``overrides``
    (``num_experts=8, top_k=2, layers="last_half", granularity=2, ...``) apply on top. Returns a converted deep
    copy (the input stays dense) unless ``inplace``.
    """
    cfg = load_convert_config(config, method=method, **overrides)
    adapter = get_adapter(adapter) if isinstance(adapter, str) else adapter or find_adapter(model)
    source = adapter.describe(model)
    target = model if inplace else copy.deepcopy(model)
    sites = adapter.ffn_sites(target)
    chosen = select_layers(len(sites), cfg.layers)
    method = get_method(cfg.method)
    contexts = [{}] * len(chosen)
    if method.prepare is not None:  # whole-model work (calibration, a predecessor) before any FFN is replaced
        contexts = [{"context": c} for c in method.prepare(target, adapter, [sites[i] for i in chosen], cfg)]
    generator = torch.Generator().manual_seed(cfg.seed)
    layers = {}
    for index, context in tqdm(zip(chosen, contexts, strict=True), total=len(chosen), desc=f"{cfg.method}",
                               unit="layer", disable=not progress, leave=False):  # fmt: skip
        site = sites[index]
        dense = adapter.read_ffn(target, site)
        try:
            moe = method.fn(dense, cfg, generator, **context)
        except ValueError as error:
            raise ValueError(f"{site.name}: {error}") from None
        moe.experts.backend = cfg.backend
        moe.train(target.training)  # follow the host's mode: a dynamic-k router runs every expert in training mode
        adapter.install(target, site, moe)
        layers[site.name] = {"index": site.index, **describe_moe(moe)}
    record = {
        "version": RECORD_VERSION,
        "adapter": adapter.name,
        "source": source,
        "dtype": str(next(target.parameters()).dtype).removeprefix("torch."),
        "convert": cfg.model_dump(exclude=RUNTIME_FIELDS),
        "layers": layers,
    }
    target.upcycle_record = json_pure(record)
    check_finite(target.state_dict().items(), "the converted model",
                 f"check the {cfg.method} options (a scale or std too large?)")  # fmt: skip
    return target


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


def convert_source(
    source: str,
    out: str | Path,
    config: ConvertConfig | dict | str | Path | None = None,
    *,
    checkpoint: str | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    stream: bool = False,
    verify_seed: int | None = 0,
    **overrides,
) -> dict:
    """Load SOURCE, convert it, save it to ``out`` and (unless ``verify_seed`` is None) measure max |moe - dense|.

    ``stream``: convert a Llama-family safetensors directory tensor by tensor without loading it (larger than RAM).
    """
    from .atomic import check_not_overlapping
    from .export import save
    from .sources import load_source
    from .verify import verify

    out = Path(out)
    load_convert_config(config, **overrides)  # a bad recipe fails before the source is read
    check_not_overlapping(out, source, overwrite)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    if stream:
        from .stream import convert_streaming

        path = convert_streaming(source, out, config, overwrite=overwrite, **overrides)
        return {"out": str(path), "max_abs_diff": None}
    dense = load_source(source, checkpoint=checkpoint, allow_pickle=allow_pickle)
    moe = convert(dense, config=config, **overrides)
    save(moe, out, overwrite=overwrite)
    diff = None if verify_seed is None else verify(moe, dense, seed=verify_seed)
    return {"out": str(out), "max_abs_diff": diff}
