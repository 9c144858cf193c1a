"""Saving, loading and exporting converted models."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import UserError, check_finite
from .saving import NOT_SAVED, load, save

FORMATS = ("mixtral", "qwen2_moe", "timm", "bam")


def export(model: nn.Module, directory: str | Path, format: str, overwrite: bool = False, **options) -> Path:
    """Write ``model`` where its ecosystem loads it: ``mixtral`` / ``qwen2_moe`` (transformers
    ``AutoModelForCausalLM.from_pretrained``), ``timm`` (``timm.create_model("local-dir:DIR")``) or ``bam``
    (upcycle's BAM model class, through transformers' Auto classes once upcycle is imported)."""
    if format not in FORMATS:
        raise UserError(f"unknown export format {format!r}; choose one of {list(FORMATS)}")
    if options.get("layout") is not None and format != "mixtral":
        raise UserError(f"--layout chooses the mixtral tensor layout; drop it for --format {format}")
    check_finite(model.state_dict().items(), "the model to export", NOT_SAVED)
    if format == "mixtral":
        from .mixtral import export_mixtral

        return export_mixtral(model, directory, overwrite=overwrite, **options)
    if format == "qwen2_moe":
        from .qwen2_moe import export_qwen2_moe

        return export_qwen2_moe(model, directory, overwrite=overwrite, **options)
    if format == "timm":
        from .timm_export import export_timm

        return export_timm(model, directory, overwrite=overwrite, **options)
    if format == "bam":
        from .bam import export_bam

        return export_bam(model, directory, overwrite=overwrite, **options)
    raise ValueError(f"unknown export format {format!r}; choose one of {list(FORMATS)}")


__all__ = ["FORMATS", "export", "load", "save"]
