"""Safetensors shards in the Hugging Face layout, written as tensors arrive and read back with clear errors.

One file ``model.safetensors`` when everything fits in one shard, else ``model-0000i-of-0000N.safetensors`` plus
``model.safetensors.index.json`` (``{"metadata": {"total_size": ...}, "weight_map": {name: file}}``). The writer
holds at most one shard in memory, so streaming conversion of a checkpoint larger than RAM works.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


class ShardWriter:
    def __init__(self, directory: str | Path, max_shard_bytes: int, metadata: dict[str, str] | None = None):
        self.directory, self.max_shard_bytes = Path(directory), max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []  # temporary file name, tensor names
        self.total_bytes = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self.pending[name] = tensor.detach().contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        name = f"shard-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(self.directory / name), metadata=self.metadata)
        self.files.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.files:
            self._flush()
        if len(self.files) == 1:
            (self.directory / self.files[0][0]).rename(self.directory / SINGLE)
            return
        count, weight_map = len(self.files), {}
        for i, (temporary, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            (self.directory / temporary).rename(self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def shard_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (single file or indexed shards), checked to exist."""
    directory = Path(directory)
    if (directory / INDEX).is_file():
        try:
            weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise ValueError(f"{directory / INDEX} is damaged ({error})") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
    else:
        files = [directory / SINGLE]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"weights missing from {directory}: {', '.join(missing)}")
    return files


def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in shard_files(directory):
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path} cannot be read ({error}); it is truncated or corrupt") from None
    return state
