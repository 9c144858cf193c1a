"""A safetensors checkpoint read one tensor at a time, and a shard writer that keeps one output shard in memory.

Each read opens the shard file anew: safetensors memory-maps it, and pages of a mapping that stays open count toward
the process's RSS until it is closed, so one long-lived handle would "use" as much memory as the file is large.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..export.shards import INDEX, SINGLE, ShardWriter, shard_files
from .direct_io import save_file

STREAM_SHARD_BYTES = 256 * 1024**2  # small: the pending output shard is most of the peak memory

DTYPES = {  # safetensors dtype -> (torch dtype, bytes per element)
    "F64": (torch.float64, 8), "I64": (torch.int64, 8), "F32": (torch.float32, 4), "I32": (torch.int32, 4),
    "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2), "I16": (torch.int16, 2), "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1), "BOOL": (torch.bool, 1), "U64": (torch.uint64, 8), "U32": (torch.uint32, 4),
    "U16": (torch.uint16, 2),
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    nbytes: int
    dtype: torch.dtype | None  # None for a dtype not listed in DTYPES (fp8 kinds)


class ReservingShardWriter(ShardWriter):
    """A ShardWriter that can close its shard before a layer's outputs exist, so a layer's experts never sit in
    memory next to an already full shard: the peak is one shard plus the dense FFN, not plus the experts too."""

    def reserve(self, nbytes: int) -> None:
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        """ShardWriter's flush (same temporary names), the file written with direct I/O (:mod:`.direct_io`)."""
        name = f"shard-{len(self.files):05d}.safetensors"
        save_file(self.pending, self.directory / name, metadata=self.metadata)
        self.files.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0
        trim_heap()


class Checkpoint:
    """The tensors of a safetensors checkpoint directory: headers read once up front, weights read on demand."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.files = _safetensors_files(directory)
        self.tensors: dict[str, TensorInfo] = {}
        for path in self.files:
            for name, (shape, nbytes, dtype) in _header(path).items():
                self.tensors[name] = TensorInfo(path, shape, nbytes, dtype)
        self._check_index()

    def _check_index(self) -> None:
        """Every tensor the index promises must be in the shard it names (a shard replaced by another fails here)."""
        if not (self.directory / INDEX).is_file():
            return
        weight_map = json.loads((self.directory / INDEX).read_text())["weight_map"]
        held = {name: info.file.name for name, info in self.tensors.items()}
        wrong = [name for name, file in weight_map.items() if held.get(name) != file]
        if wrong:
            raise ValueError(f"{self.directory / INDEX} lists tensors its shards do not hold: {wrong[:5]}")

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each file opened once per call and closed again (see the module docstring)."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.tensors[name].file, []).append(name)
        out = {}
        for path, file_names in by_file.items():
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for name in file_names:
                        out[name] = handle.get_tensor(name)
            except (SafetensorError, OSError) as error:
                raise ValueError(f"{path} cannot be read ({error}); it is truncated or corrupt") from None
        return out


def trim_heap() -> None:
    """Give the freed shard's memory back to the OS. Tensors under glibc's mmap threshold (up to 32 MB once it has
    adapted) live on the heap, whose free holes otherwise stay resident: ~40 MB of peak RSS for SmolLM2's 3.5 MB
    projections. A no-op where the C library has no ``malloc_trim`` (musl, macOS)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _safetensors_files(directory: Path) -> list[Path]:
    if not (directory / INDEX).is_file() and not (directory / SINGLE).is_file():
        found = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".safetensors", ".pt", ".pth"))
        hint = f" (found {found}; re-save it with save_pretrained(..., safe_serialization=True))" if found else ""
        raise FileNotFoundError(f"{directory} holds no {SINGLE} nor {INDEX}{hint}")
    return shard_files(directory)  # raises FileNotFoundError naming any missing shard


def _header(path: Path) -> dict[str, tuple[tuple[int, ...], int, torch.dtype | None]]:
    """name -> (shape, bytes, dtype) from a safetensors header; safetensors also checks the file is as long as it
    says."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            slices = {name: handle.get_slice(name) for name in handle.keys()}  # noqa: SIM118
            return {name: _describe(piece) for name, piece in slices.items()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} cannot be read ({error}); it is truncated or corrupt") from None


def _describe(piece) -> tuple[tuple[int, ...], int, torch.dtype | None]:
    shape = tuple(piece.get_shape())
    dtype, size = DTYPES.get(piece.get_dtype(), (None, 1))  # the rest (fp8 kinds) are counted as bytes
    return shape, math.prod(shape) * size, dtype
