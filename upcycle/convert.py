"""``upcycle.convert``: a dense model -> the same model with MoE layers in place of (some of) its FFNs.

The adapter finds and reads the FFNs, the registered method turns each into an MoE layer, the adapter installs
it. The result's record (``upcycle.record_of``): the adapter, how to rebuild the dense skeleton, where the dense model
came from, the resolved recipe and each MoE layer's structure, which is all ``upcycle.save`` / ``upcycle.load``
need.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import Adapter, find_adapter, get_adapter
from .config import RUNTIME_FIELDS, ConvertConfig, load_convert_config, select_layers
from .errors import UserError, check_finite
from .layers import describe_moe
from .record import attach_record, copy_model, dtype_name, new_record, record_of
from .recycling import get_method


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
    source, dense_record = adapter.describe(model), record_of(model)
    # the copy keeps the dense model's record: calibration (CMoE, routers from data) reads text with its tokenizer
    target = model if inplace else copy_model(model)
    sites = adapter.ffn_sites(target)
    chosen = select_layers(len(sites), cfg.layers)
    method = get_method(cfg.method)
    contexts = [{}] * len(chosen)
    if method.prepare is not None:  # whole-model work (calibration, a predecessor) before any FFN is replaced
        contexts = [{"context": c} for c in method.prepare(target, adapter, [sites[i] for i in chosen], cfg)]
    generator = torch.Generator().manual_seed(cfg.seed)
    dtype = next(target.parameters()).dtype  # the dtype the record notes and upcycle.load rebuilds the model in
    storage_before = {name: storage_of(t) for name, t in target.state_dict().items()}
    read, layers = set(), {}
    for index, context in tqdm(zip(chosen, contexts, strict=True), total=len(chosen), desc=f"{cfg.method}",
                               unit="layer", disable=not progress, leave=False):  # fmt: skip
        site = sites[index]
        dense = adapter.read_ffn(target, site)
        read |= {storage_of(t) for t in dense.tensors().values()} | {
            storage_before[name] for name in adapter.folded_tensors(target, site)
        }
        try:
            moe = method.fn(dense, cfg, generator, **context)
        except ValueError as error:
            raise ValueError(f"{site.name}: {error}") from None
        moe.experts.backend = cfg.backend
        moe.to(dtype)  # new weights (routers) are drawn in float32: a bfloat16 model would fail on its own MoE layers
        adapter.install(target, site, moe)
        # the installed wrapper follows the host's mode: its output dropout must not fire in an eval-mode model, and
        # a dynamic-k router runs every expert in training mode
        target.get_submodule(site.name).train(target.training)
        layers[site.name] = {"index": site.index, **describe_moe(moe)}
    if method.finish is not None:  # whole-model work once the FFNs are replaced (a readout): the description follows
        source, dropped = method.finish(target, adapter, cfg, source)
        read |= {storage_before[name] for name in dropped}
    check_nothing_dropped(storage_before, read, target)
    if cfg.router.init == "data":  # every layer is in place: the calibration runs through the converted model
        from .routers_from_data import init_routers_from_data

        init_routers_from_data(target, cfg.router.init_data, examples=cfg.router.init_examples, seed=cfg.seed,
                               adapter=adapter, progress=progress)  # fmt: skip
    convert_recipe = cfg.model_dump(exclude=RUNTIME_FIELDS)
    attach_record(target, new_record(adapter.name, source, dtype_name(target), layers, convert=convert_recipe,
                                     origin=dense_record))  # fmt: skip
    check_finite(target.state_dict().items(), "the converted model",
                 f"check the {cfg.method} options (a scale or std too large?)")  # fmt: skip
    return target


def storage_of(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def check_nothing_dropped(storage_before: dict[str, int], read: set[int], model: nn.Module) -> None:
    """No silent drops: every tensor the conversion removed from the model was read into an MoE layer (a view of it,
    or folded by the adapter). A family whose FFN holds more than its adapter maps stops here, naming the tensors,
    instead of converting into a model that computes something else."""
    remaining = set(model.state_dict())
    dropped = [name for name, storage in storage_before.items() if name not in remaining and storage not in read]
    if dropped:
        raise ValueError(
            f"the conversion would drop {len(dropped)} source tensor(s) that no MoE layer holds: "
            f"{', '.join(dropped[:8])}; the adapter does not map this family's FFN completely (please report it)"
        )


def convert_source(
    source: str,
    out: str | Path,
    config: ConvertConfig | dict | str | Path | None = None,
    *,
    checkpoint: str | None = None,
    allow_pickle: bool = False,
    pretrained: bool = False,
    random_init: bool = False,
    dtype: str = "auto",
    overwrite: bool = False,
    stream: bool = False,
    verify_seed: int | None = 0,
    export: str | None = None,
    layout: str | None = None,
    check: bool = True,
    **overrides,
) -> dict:
    """Load SOURCE, convert it, save it to ``out`` and (unless ``verify_seed`` is None) measure max |moe - dense|.

    SOURCE and its flags (``checkpoint``, ``pretrained``, ``random_init``, ``dtype``) are those of
    :func:`upcycle.sources.load_source`; ``dtype="auto"`` keeps the source's. ``export``: write that export format
    (``upcycle.export``; ``layout`` for mixtral) instead of upcycle's own. ``stream``: convert a Llama-family
    safetensors directory (or hub id) tensor by tensor without loading it (larger than RAM), into upcycle's format or
    Mixtral, each converted layer checked against its dense FFN unless ``check`` is False
    (:func:`upcycle.stream.stream`).
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
    if layout is not None and export != "mixtral":
        raise UserError("--layout chooses the mixtral tensor layout; use it with --export mixtral")
    if stream:
        from .stream import stream as stream_checkpoint

        done = stream_checkpoint(source, out, config, format=export or "upcycle", layout=layout, check=check,
                                 overwrite=overwrite, **overrides)  # fmt: skip
        return {"out": str(done.out), "max_abs_diff": None, "worst_layer": done.worst_layer,
                "worst_relative": done.worst_relative}  # fmt: skip
    dense = load_source(source, checkpoint=checkpoint, allow_pickle=allow_pickle, pretrained=pretrained,
                        random_init=random_init, dtype=dtype)  # fmt: skip
    moe = convert(dense, config=config, **overrides)
    if export is not None:
        from .export import export as export_model

        export_model(moe, out, format=export, overwrite=overwrite, layout=layout)
    else:
        save(moe, out, overwrite=overwrite)
    diff = None if verify_seed is None else verify(moe, dense, seed=verify_seed)
    return {"out": str(out), "max_abs_diff": diff}
