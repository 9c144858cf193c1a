"""The record of a conversion: what was converted from what, and how. One typed object, built by :func:`new_record`
only, saved as the output's config.json (and its recipe.yaml), read back by ``upcycle.load`` and consulted by export,
eval and training.

A model's record is kept beside the model, never on it (``record_of(model)``; a weak reference, so it goes when the
model goes): loaders attach one saying where a dense model came from, ``upcycle.convert`` / ``upcycle.merge`` attach
the full one. ``copy.deepcopy`` does not see it: :func:`copy_model` copies a model with its record.
"""

from __future__ import annotations

import copy
import json
import weakref
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path

from torch import nn

from .errors import UserError
from .layers import moe_layers

RECORD_VERSION = 1
VERSIONED = ("upcycle", "torch", "transformers", "timm")  # the libraries whose versions a record notes


@dataclass
class ConversionRecord:
    adapter: str | None = None  # the model family's adapter (upcycle list adapters)
    source: dict | None = None  # the adapter's description of the dense model: rebuilds its skeleton
    dtype: str | None = None
    layers: dict[str, dict] = field(default_factory=dict)  # converted site -> {"index", experts, router, ...}
    convert: dict | None = None  # the resolved convert recipe (method, options, router, seed, ...)
    merge: dict | None = None  # or the merge recipe (upcycle.merge)
    origin: str | None = None  # the SOURCE the dense model was read from: a folder, a .gguf file, timm:ARCH, a hub id
    revision: str | None = None  # the commit it was read at, when it came from the hub (a hub id, a timm tag)
    weights: str | None = None  # for timm:ARCH: "pretrained", "random init" (--random-init) or the checkpoint file
    versions: dict[str, str] = field(default_factory=dict)  # library versions when the record was made
    version: int = RECORD_VERSION
    files: str | None = field(default=None, compare=False)  # where its tokenizer files are now (not saved)

    def to_json(self) -> dict:
        """Plain JSON data, exactly as it reads back (tuples become lists), without the in-memory ``files``."""
        data = {key: value for key, value in asdict(self).items() if key != "files"}
        try:
            return json.loads(json.dumps(data))
        except TypeError as error:
            raise ValueError(f"the model description is not plain data ({error}); pass JSON-friendly kwargs") from None

    @classmethod
    def from_json(cls, data: object, where: str = "the record") -> ConversionRecord:
        """A record read from a file, checked: a damaged or foreign file is refused with what to do."""
        if not isinstance(data, dict) or data.get("version") != RECORD_VERSION:
            raise UserError(f"{where} is not an upcycle record of version {RECORD_VERSION}")
        known = {f.name for f in fields(cls)} - {"files"}
        missing = [key for key in ("adapter", "source", "layers") if not isinstance(data.get(key), dict | str)]
        if missing or set(data) - known:
            problem = f"lacks {', '.join(missing)}" if missing else f"has unknown fields {sorted(set(data) - known)}"
            raise UserError(f"{where} {problem} of an upcycle record; the directory is damaged: convert or save the "
                            "model again")  # fmt: skip
        return cls(**data)

    @classmethod
    def of_folder(cls, folder: str | Path) -> ConversionRecord:
        """A dense model read from ``folder``: where it came from, and where its tokenizer files are."""
        return cls(origin=str(folder), files=str(folder))


def library_versions() -> dict[str, str]:
    found = {}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def new_record(adapter: str, source: dict, dtype: str, layers: dict | None = None, *, convert: dict | None = None,
               merge: dict | None = None, origin: ConversionRecord | None = None) -> ConversionRecord:  # fmt: skip
    """The one place a record is made: what the model is, how it was made, from what (``origin``: the dense model's
    record, whose origin, revision, weights and files carry over), and the library versions now."""
    origin = origin or ConversionRecord()
    record = ConversionRecord(
        adapter=adapter, source=source, dtype=dtype, layers=layers or {}, convert=convert, merge=merge,
        origin=origin.origin, revision=origin.revision, weights=origin.weights, versions=library_versions(),
        files=origin.files,
    )  # fmt: skip
    # exactly as it reads back from config.json (tuples become lists), or a clear error now rather than at save time
    return ConversionRecord(**record.to_json(), files=origin.files)


_RECORDS: weakref.WeakKeyDictionary[nn.Module, ConversionRecord] = weakref.WeakKeyDictionary()


def record_of(model: nn.Module) -> ConversionRecord | None:
    return _RECORDS.get(model)


def attach_record(model: nn.Module, record: ConversionRecord) -> ConversionRecord:
    _RECORDS[model] = record
    return record


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that keeps its record (``copy.deepcopy`` copies the model only)."""
    duplicate = copy.deepcopy(model)
    record = record_of(model)
    if record is not None:
        attach_record(duplicate, copy.deepcopy(record))
    return duplicate


def dtype_name(model: nn.Module) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def sync_router_specs(model: nn.Module) -> None:
    """Refresh each recorded layer's router spec from the live router: options set after conversion (the dynamic-k
    ``tau``, ``top_k``, see ``set_tau`` / ``set_top_k``) are part of what a saved model must reload with."""
    record = record_of(model)
    sites = record.layers if record is not None else {}
    for name, layer in moe_layers(model):
        site = next((site for site in sites if name == site or name.startswith(f"{site}.")), None)
        if site is not None:
            sites[site]["router"] = json.loads(json.dumps(layer.router.spec()))
