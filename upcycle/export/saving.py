"""``upcycle.save`` / ``upcycle.load``: a converted model as a directory that loads without its source.

    model.safetensors   every tensor of the converted model (shared tensors, e.g. tied embeddings, stored once);
                        past ``max_shard_bytes``: model-00001-of-0000N.safetensors + model.safetensors.index.json
                        (the Hugging Face convention)
    config.json         the conversion record: adapter, dense skeleton description, dtype, each MoE layer's shape
    recipe.yaml         the resolved conversion recipe (the same YAML ``upcycle convert --config`` reads)

Writes are atomic (a temporary sibling directory renamed into place). Loading rebuilds the dense skeleton from
config.json, installs MoE layers of the recorded shapes, then loads the weights strictly, with clear errors for a
missing or truncated file or weights that do not match the recorded structure.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from torch import nn

from ..adapters import adapter_of, get_adapter
from ..adapters.base import FFNSite, ensure_record
from ..atomic import atomic_directory
from ..errors import check_finite
from ..layers import build_moe
from ..record import ConversionRecord, attach_record, record_of, sync_router_specs
from .shards import ShardWriter, read_weights
from .tokenizer_files import copy_tokenizer_files

CONFIG, RECIPE = "config.json", "recipe.yaml"
NOT_SAVED = "nothing was written (a model with NaN / Inf weights would load but compute NaN)"
DEFAULT_SHARD_BYTES = 2 * 1024**3


def save(model: nn.Module, directory: str | Path, overwrite: bool = False,
         max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:  # fmt: skip
    record = ensure_record(model)
    sync_router_specs(model)
    check_rebuild(model)
    check_finite(model.state_dict().items(), "the model to save", NOT_SAVED)
    directory = Path(directory)
    with atomic_directory(directory, overwrite=overwrite) as staging:
        with ShardWriter(staging, max_shard_bytes) as writer:
            for name, tensor in unique_state(model).items():
                writer.add(name, tensor)
        write_record(staging, record)
        copy_tokenizer_files(model, staging)
    return directory


def check_exportable(model: nn.Module, format: str) -> None:
    """Refuse, with the reason, unless the model's adapter says ``format`` stores it exactly."""
    reason = adapter_of(model).export_refusal(model, format)
    if reason is not None:
        raise ValueError(f"cannot export as {format!r}: {reason}")


def write_record(directory: Path, record: ConversionRecord) -> None:
    data = record.to_json()
    (directory / CONFIG).write_text(json.dumps(data, indent=2) + "\n")
    recipe = {key: data[key] for key in ("convert", "merge") if data.get(key) is not None}
    if recipe:  # a dense model (e.g. after upcycle pretrain) has no recipe
        (directory / RECIPE).write_text(yaml.safe_dump(recipe, sort_keys=False))


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tensors that share storage (tied embeddings) kept once, under their first name."""
    seen: set[tuple[int, int]] = set()
    unique = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        unique[name] = tensor.detach().contiguous()
    return unique


def check_rebuild(model: nn.Module) -> None:
    """Refuse to save a model whose skeleton cannot be rebuilt from its record with every tensor's shape."""
    record = record_of(model)
    skeleton = build_skeleton(record).state_dict()
    actual = model.state_dict()
    problems = [name for name in actual if name not in skeleton]
    problems += [
        f"{name} {tuple(t.shape)} rebuilt as {tuple(skeleton[name].shape)}"
        for name, t in actual.items()
        if name in skeleton and t.shape != skeleton[name].shape
    ]
    if problems:
        hint = ""
        if "kwargs" in record.source:
            hint = (
                "\nload the dense model with upcycle (timm:ARCH, upcycle.load), which records the timm.create_model "
                "keyword arguments it was built with, before upcycle.convert"
            )
        raise ValueError("the model cannot be rebuilt from its record: " + "; ".join(problems[:5]) + hint)


def read_record(directory: str | Path) -> ConversionRecord:
    directory = Path(directory)
    config_path = directory / CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} is not an upcycle model directory: {CONFIG} is missing")
    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON ({error}); the directory is damaged") from None
    return ConversionRecord.from_json(data, str(config_path))


def build_skeleton(record: ConversionRecord) -> nn.Module:
    """The converted model's structure from its record, with freshly initialised weights; the record attached."""
    adapter = get_adapter(record.adapter)
    model = adapter.rebuild(record.source)
    for name, spec in record.layers.items():
        adapter.install(model, FFNSite(spec["index"], name), build_moe(spec))
    attach_record(model, record)
    return model.to(getattr(torch, record.dtype or "float32"))


def load(directory: str | Path) -> nn.Module:
    directory = Path(directory)
    record = read_record(directory)
    state = read_weights(directory)
    check_finite(state.items(), f"the model in {directory}", "the directory is damaged; convert or train it again")
    record.files = str(directory)  # the tokenizer files were saved next to the weights
    model = build_skeleton(record)
    load_weights(model, state, directory)
    return model.eval()


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], origin: Path | str) -> None:
    """Strict load that tolerates tied tensors saved once, with a message naming what does not fit."""
    expected = model.state_dict()
    mismatched = [
        f"{name}: file {tuple(tensor.shape)} vs model {tuple(expected[name].shape)}"
        for name, tensor in state.items()
        if name in expected and tuple(tensor.shape) != tuple(expected[name].shape)
    ]
    if mismatched:
        raise ValueError(f"weights in {origin} do not match the recorded structure:\n  " + "\n  ".join(mismatched[:10]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {name for name in missing if _is_tied(model, name, state)}
    missing = [name for name in missing if name not in tied]
    if missing or unexpected:
        raise ValueError(
            f"weights in {origin} do not match the recorded structure: missing {missing[:10]}, "
            f"unexpected {unexpected[:10]}"
        )


def _is_tied(model: nn.Module, name: str, state: dict) -> bool:
    """True if parameter ``name`` shares storage with a parameter that was loaded (e.g. lm_head and embeddings)."""
    target = model.get_parameter(name) if name in dict(model.named_parameters(remove_duplicate=False)) else None
    if target is None:
        return False
    for other, param in model.named_parameters(remove_duplicate=False):
        if other != name and other in state and param.data_ptr() == target.data_ptr():
            return True
    return False
