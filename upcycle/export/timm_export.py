"""Export a converted timm model so timm rebuilds it by name: ``timm.create_model("local-dir:DIR")``.

The directory holds ``model.safetensors`` and a timm-style ``config.json`` whose ``architecture`` is the
``upcycle_moe`` entrypoint and whose ``model_args`` carry the conversion record. ``import upcycle`` registers the
entrypoint with timm's registry (at once if timm is imported, else the moment it is), so timm's own
``local-dir:`` loader builds the MoE skeleton from the record and loads the weights; no hub, no pickle.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import sys
from pathlib import Path

from torch import nn

from ..atomic import atomic_directory
from .saving import build_skeleton, check_rebuild, load_weights, unique_state
from .shards import ShardWriter, read_weights

ARCHITECTURE = "upcycle_moe"
_TIMM_CFG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode", "first_conv", "classifier")


def export_timm(model: nn.Module, directory: str | Path, overwrite: bool = False) -> Path:
    record = getattr(model, "upcycle_record", None)
    if record is None or record["adapter"] not in ("timm_vit", "timm_convnext"):
        raise ValueError("--format timm needs a converted timm model (adapter timm_vit or timm_convnext)")
    check_rebuild(model)
    source_cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    pretrained_cfg = {key: source_cfg[key] for key in _TIMM_CFG_KEYS if key in source_cfg}
    config = {
        "architecture": ARCHITECTURE,
        "num_classes": model.num_classes,
        "num_features": getattr(model, "num_features", None),
        "pretrained_cfg": pretrained_cfg,
        "model_args": {"upcycle_record": record},
    }
    with atomic_directory(Path(directory), overwrite=overwrite) as staging:
        with ShardWriter(staging, max_shard_bytes=1 << 62) as writer:  # timm reads one model.safetensors
            for name, tensor in unique_state(model).items():
                writer.add(name, tensor)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(directory)


def upcycle_moe(pretrained: bool = False, pretrained_cfg=None, upcycle_record: dict | None = None, **kwargs):
    """timm entrypoint: the converted model described by ``upcycle_record``, with its weights if ``pretrained``."""
    if upcycle_record is None:
        raise ValueError("upcycle_moe is built from an exported directory: timm.create_model('local-dir:DIR')")
    model = build_skeleton(upcycle_record)
    requested = kwargs.get("num_classes")
    if requested is not None and requested != model.num_classes:
        raise ValueError(f"the exported model has {model.num_classes} classes; resizing its head is not supported")
    if pretrained:
        cfg = pretrained_cfg if isinstance(pretrained_cfg, dict) else pretrained_cfg.to_dict()
        load_weights(model, read_weights(cfg["file"]), cfg["file"])
    return model


def _register() -> None:
    from timm.models import is_model, register_model

    if not is_model(ARCHITECTURE):
        register_model(upcycle_moe)


class _RegisterAfterTimmImport(importlib.abc.MetaPathFinder):
    """Runs ``_register`` right after ``import timm`` finishes, so importing upcycle does not import timm.

    It stays on ``sys.meta_path`` until timm has really been executed: libraries probe ``find_spec("timm")`` only
    to test availability (transformers does), and those probes must not use it up.
    """

    def find_spec(self, name, path, target=None):
        if name != "timm":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)  # the ordinary finder, without recursing here
        if spec is not None and spec.loader is not None:
            run_module = spec.loader.exec_module

            def exec_then_register(module) -> None:
                run_module(module)
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                _register()

            spec.loader.exec_module = exec_then_register
        return spec


def register_with_timm() -> None:
    if "timm" in sys.modules:
        _register()
    elif not any(isinstance(finder, _RegisterAfterTimmImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTimmImport())
