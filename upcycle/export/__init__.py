"""Saving, loading and exporting converted models."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import UserError, check_finite

# each writer registers its format
from . import (  # noqa: F401
    bam,
    cohere2_moe,
    deepseek_v3,
    ernie4_5_moe,
    flex_olmo,
    gguf,
    glm4_moe,
    granitemoe,
    hf_generic,
    hunyuan_v1_moe,
    mixtral,
    qwen2_moe,
    qwen3_moe,
    timm_export,
)
from .formats import EXPORT_FORMATS
from .saving import NOT_SAVED, load, save

AUTO = "auto"


def export(model: nn.Module, directory: str | Path, format: str, overwrite: bool = False, **options) -> Path:
    """Write ``model`` where its ecosystem loads it, in a registered format (``upcycle list formats``): ``mixtral`` /
    ``qwen2_moe`` (transformers ``AutoModelForCausalLM.from_pretrained``), ``hf_generic`` (any converted
    transformers model, ``from_pretrained(dir, trust_remote_code=True)``), ``timm`` (``timm.create_model(
    "local-dir:DIR")``) or ``bam`` (upcycle's BAM model class, through transformers' Auto classes once upcycle is
    imported); ``auto``: the first of the model's exact twins that stores it, else the generic class.
    ``options`` go to the format's writer (``layout`` for mixtral)."""
    if format == AUTO:
        return export_auto(model, directory, overwrite, **options)
    if format not in EXPORT_FORMATS:
        choices = ", ".join([AUTO, *EXPORT_FORMATS.names()])
        raise UserError(f"unknown export format {format!r}; choose one of {choices}")
    if options.get("layout") is not None and format != "mixtral":
        raise UserError(f"--layout chooses the mixtral tensor layout; drop it for --format {format}")
    if options.get("arch") is not None and format != "gguf":
        raise UserError(f"--arch chooses the GGUF architecture; drop it for --format {format}")
    check_finite(model.state_dict().items(), "the model to export", NOT_SAVED)
    writer = EXPORT_FORMATS.get(format)
    return writer(model, directory, overwrite=overwrite, **{k: v for k, v in options.items() if v is not None})


def export_auto(model: nn.Module, directory: str | Path, overwrite: bool = False, **options) -> Path:
    """Try the adapter's formats in order (exact twins first, the generic class last); every writer checks
    everything before it writes, so a refusal leaves nothing behind and the next format is tried."""
    from ..adapters import adapter_of

    adapter = adapter_of(model)
    candidates = [*adapter.export_formats, *([adapter.generic_format] if adapter.generic_format else [])]
    refusals = []
    for candidate in candidates:
        accepted = {k: v for k, v in options.items() if k != "layout" or candidate == "mixtral"}
        try:
            return export(model, directory, candidate, overwrite, **accepted)
        except ValueError as error:  # UserError (a bad option, an existing directory) is the user's to fix
            if isinstance(error, UserError):
                raise
            refusals.append(f"  {candidate}: {error}")
    if not candidates:
        refusals.append(f"  the {adapter.name!r} adapter names no export format")
    raise UserError("no export format stores this model exactly:\n" + "\n".join(refusals))


def chosen_format(directory: str | Path) -> str | None:
    """The format an export directory was written in, from its note (``auto`` tells the caller what it chose)."""
    import json

    from .hf_moe_common import EXPORT_NOTE

    note = Path(directory) / EXPORT_NOTE
    return json.loads(note.read_text()).get("format") if note.is_file() else None


__all__ = ["EXPORT_FORMATS", "export", "load", "save"]
