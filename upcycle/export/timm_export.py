"""Export a converted timm model so timm rebuilds it by name: ``timm.create_model("local-dir:DIR")``.

The directory holds ``model.safetensors`` and a timm-style ``config.json`` whose ``architecture`` is the
``upcycle_moe`` entrypoint and whose ``model_args`` carry the conversion record. Once the entrypoint is in timm's
registry (``upcycle.register_with_timm()``; ``import upcycle`` does it if timm is already imported, exporting does
it too), timm's own ``local-dir:`` loader builds the MoE skeleton from the record and loads the weights; no hub,
no pickle.

No silent drops: the export refuses, naming them, any tensor of the dense source (rebuilt from the record) that is
neither in the converted model nor under a replaced FFN site, whose content the experts carry.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..adapters import get_adapter
from ..adapters.base import ensure_record
from ..atomic import atomic_directory
from ..errors import UserError
from ..record import ConversionRecord
from .formats import EXPORT_FORMATS
from .saving import build_skeleton, check_exportable, check_rebuild, load_weights, unique_state
from .shards import ShardWriter, read_weights

ARCHITECTURE = "upcycle_moe"
_TIMM_CFG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode", "first_conv", "classifier")


@EXPORT_FORMATS.register("timm", "timm: timm.create_model('local-dir:DIR') rebuilds the converted model by name")
def export_timm(model: nn.Module, directory: str | Path, overwrite: bool = False) -> Path:
    check_exportable(model, "timm")
    record = ensure_record(model)  # a dense timm model exports too (no MoE layer)
    check_rebuild(model)
    check_covers_source(model, record)
    source_cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    pretrained_cfg = {key: source_cfg[key] for key in _TIMM_CFG_KEYS if key in source_cfg}
    config = {
        "architecture": ARCHITECTURE,
        "num_classes": model.num_classes,
        "num_features": getattr(model, "num_features", None),
        "pretrained_cfg": pretrained_cfg,
        "model_args": {"upcycle_record": record.to_json()},
    }
    with atomic_directory(Path(directory), overwrite=overwrite) as staging:
        with ShardWriter(staging, max_shard_bytes=1 << 62) as writer:  # timm reads one model.safetensors
            for name, tensor in unique_state(model).items():
                writer.add(name, tensor)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    register_with_timm()  # timm.create_model("local-dir:DIR") works at once in this process
    return Path(directory)


def check_covers_source(model: nn.Module, record: ConversionRecord) -> None:
    """Refuse to export a model that lost tensors of its dense source outside the replaced FFN sites.

    ``check_rebuild`` compares the model with its skeleton, which the same adapter installs the same way, so a tensor
    that an install dropped beside its FFN (or a module removed by hand) passes it and is then missing for good.
    """
    dense = get_adapter(record.adapter).rebuild(record.source).state_dict()
    present = set(model.state_dict())
    replaced = tuple(f"{site}." for site in record.layers)
    lost = [name for name in dense if name not in present and not name.startswith(replaced)]
    if lost:
        more = f" and {len(lost) - 10} more" if len(lost) > 10 else ""
        raise UserError(
            f"cannot export as 'timm': the converted model lacks {len(lost)} tensor(s) of its dense source that no "
            f"replaced FFN accounts for: {', '.join(lost[:10])}{more}; nothing was written"
        )


def upcycle_moe(pretrained: bool = False, pretrained_cfg=None, upcycle_record: dict | None = None, **kwargs):
    """timm entrypoint: the converted model described by ``upcycle_record``, with its weights if ``pretrained``."""
    if upcycle_record is None:
        raise ValueError("upcycle_moe is built from an exported directory: timm.create_model('local-dir:DIR')")
    model = build_skeleton(ConversionRecord.from_json(upcycle_record, "the exported config.json's upcycle_record"))
    requested = kwargs.get("num_classes")
    if requested is not None and requested != model.num_classes:
        raise ValueError(f"the exported model has {model.num_classes} classes; resizing its head is not supported")
    if pretrained:
        cfg = pretrained_cfg if isinstance(pretrained_cfg, dict) else pretrained_cfg.to_dict()
        load_weights(model, read_weights(cfg["file"]), cfg["file"])
    return model


def register_with_timm() -> None:
    """Teach timm's registry the ``upcycle_moe`` entrypoint, so ``timm.create_model("local-dir:DIR")`` builds an
    exported model. Imports timm; idempotent. ``import upcycle`` calls it when timm is already imported, and
    exporting calls it, so only a process that imports upcycle before timm and then loads an export calls it."""
    from timm.models import is_model, register_model

    if not is_model(ARCHITECTURE):
        register_model(upcycle_moe)
