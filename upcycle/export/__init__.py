"""Saving, loading and exporting converted models."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import UserError, check_finite
from . import bam, mixtral, qwen2_moe, qwen3_moe, timm_export  # noqa: F401  (each writer registers its format)
from .formats import EXPORT_FORMATS
from .saving import NOT_SAVED, load, save


def export(model: nn.Module, directory: str | Path, format: str, overwrite: bool = False, **options) -> Path:
    """Write ``model`` where its ecosystem loads it, in a registered format (``upcycle list formats``): ``mixtral`` /
    ``qwen2_moe`` (transformers ``AutoModelForCausalLM.from_pretrained``), ``timm`` (``timm.create_model(
    "local-dir:DIR")``) or ``bam`` (upcycle's BAM model class, through transformers' Auto classes once upcycle is
    imported). ``options`` go to the format's writer (``layout`` for mixtral)."""
    if format not in EXPORT_FORMATS:
        raise UserError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS.names())}")
    if options.get("layout") is not None and format != "mixtral":
        raise UserError(f"--layout chooses the mixtral tensor layout; drop it for --format {format}")
    check_finite(model.state_dict().items(), "the model to export", NOT_SAVED)
    writer = EXPORT_FORMATS.get(format)
    return writer(model, directory, overwrite=overwrite, **{k: v for k, v in options.items() if v is not None})


__all__ = ["EXPORT_FORMATS", "export", "load", "save"]
