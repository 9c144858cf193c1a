"""Streaming conversion: a Hugging Face checkpoint directory of a family whose adapter declares its tensor layout
(``Adapter.checkpoint_layout``: the Llama family) -> an upcycle model directory or a Mixtral checkpoint, one tensor
at a time, so checkpoints larger than memory convert.

``upcycle.convert`` needs the whole dense model in memory, and ``upcycle.save`` / ``upcycle.export`` then hold the
whole converted model (E copies of every FFN). Sparse upcycling (Komatsuzaki et al., arXiv 2212.05055) only ever
looks at one FFN at a time, so the conversion can stream instead:

  1. read config.json and the safetensors *headers* (names, shapes; no weights) and check every layer's FFN
     against config.json, so a bad checkpoint fails before any work (:mod:`.plan`);
  2. walk the tensors, layers in increasing index order: each tensor outside a converted FFN is read and passed
     through; each converted FFN is read whole, turned into an MoE layer by the registered method and written in
     the chosen format: upcycle's own (:mod:`.native`, what ``upcycle.save(upcycle.convert(...))`` writes) or
     Mixtral (:mod:`.mixtral`, what ``upcycle.export(..., format="mixtral")`` then writes);
  3. check every converted layer against its dense FFN on random tokens (:mod:`.check`), write the config and the
     tokenizer files, and rename the directory into place: a failed check leaves nothing behind.

Memory: the output shard being filled (``max_shard_bytes``, 256 MiB by default here, against 2 GiB for
``upcycle.save``) plus one dense FFN and its experts, on top of the interpreter with torch and transformers' config
machinery (~0.4 GB); the model class (~0.15 GB more) is imported only once the weights are written.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..atomic import atomic_directory
from ..config import ConvertConfig, load_convert_config
from .check import DEFAULT_RTOL, EquivalenceCheck
from .checkpoint import STREAM_SHARD_BYTES, Checkpoint
from .native import write_native
from .plan import Plan, prepare
from .producer import Producer, Upcycling

FORMATS = ("upcycle", "mixtral")


@dataclass(frozen=True)
class Streamed:
    """What :func:`stream` wrote, and its equivalence check (None when skipped)."""

    out: Path
    format: str
    worst_layer: str | None = None  # the converted layer farthest from its dense FFN
    worst_relative: float | None = None  # its max |moe - dense| / max |dense| on random tokens


def convert_streaming(
    source_dir: str | Path,
    out_dir: str | Path,
    config: ConvertConfig | dict | str | Path | None = None,
    *,
    format: str = "upcycle",
    layout: str | None = None,
    check: bool = True,
    rtol: float = DEFAULT_RTOL,
    overwrite: bool = False,
    progress: bool = True,
    max_shard_bytes: int = STREAM_SHARD_BYTES,
    **overrides,
) -> Path:
    """Convert the checkpoint in ``source_dir`` (a folder, or a hub id) tensor by tensor into ``out_dir``.

    ``config`` and ``overrides`` are those of :func:`upcycle.convert` (``method="sparse_upcycling",
    num_experts=8, top_k=2, layers="every_other", ...``). ``format="upcycle"`` writes what ``upcycle.save`` writes
    for ``upcycle.convert(AutoModelForCausalLM.from_pretrained(source_dir), config)`` (``upcycle.load(out_dir)``
    reads it); ``format="mixtral"`` what ``upcycle.export(that model, out_dir, format="mixtral", layout=layout)``
    writes, tokenizer files included (``AutoModelForCausalLM.from_pretrained(out_dir)``). ``check``: every converted
    layer must reproduce its dense FFN within ``rtol`` (see :mod:`upcycle.stream.check`), else nothing is written.
    The write is atomic; an existing ``out_dir`` is replaced only with ``overwrite``. ``max_shard_bytes`` bounds the
    output shard held in memory, hence most of the peak memory.
    """
    return stream(source_dir, out_dir, config, format=format, layout=layout, check=check, rtol=rtol,
                  overwrite=overwrite, progress=progress, max_shard_bytes=max_shard_bytes, **overrides).out  # fmt: skip


def stream(
    source_dir: str | Path,
    out_dir: str | Path,
    config: ConvertConfig | dict | str | Path | None = None,
    *,
    format: str = "upcycle",
    layout: str | None = None,
    check: bool = True,
    rtol: float = DEFAULT_RTOL,
    overwrite: bool = False,
    progress: bool = True,
    max_shard_bytes: int = STREAM_SHARD_BYTES,
    **overrides,
) -> Streamed:
    """:func:`convert_streaming`, returning the check's worst layer too."""
    check_format(format, layout)
    cfg = load_convert_config(config, **overrides)
    out_dir = Path(out_dir)
    plan = prepare(source_dir, out_dir, cfg, overwrite)
    checker = EquivalenceCheck(rtol) if check else None
    with one_thread(), atomic_directory(out_dir, overwrite=overwrite) as staging:
        bar = tqdm(total=plan.total, desc=f"stream {cfg.method} -> {format}", unit="tensor", disable=not progress,
                   leave=False)  # fmt: skip
        with bar:
            write(Upcycling(plan), staging, format, layout, max_shard_bytes, bar, checker)
    worst_layer, worst = checker.worst if checker is not None else (None, None)
    return Streamed(out_dir, format, worst_layer, worst)


@contextmanager
def one_thread() -> Iterator[None]:
    """torch with one intra-op thread for the duration. Streaming copies memory and writes files: a second thread
    does not speed up copies the memory bus bounds, and on 2 cores with any other load OpenMP's waiting threads
    slowed the SmolLM2 job (convert + export) from 12 s to 27-37 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def check_format(format: str, layout: str | None) -> None:
    if format not in FORMATS:
        raise ValueError(f"streaming writes format {' or '.join(FORMATS)}, not {format!r}; convert in memory and "
                         "export for the others")  # fmt: skip
    if layout is not None and format != "mixtral":
        raise ValueError(f"layout chooses the mixtral tensor layout; drop it for format {format!r}")


def write(producer: Producer, staging: Path, format: str, layout: str | None, max_shard_bytes: int, bar: tqdm,
          check: EquivalenceCheck | None) -> None:  # fmt: skip
    """Write ``producer``'s model into ``staging`` in ``format``."""
    if format == "mixtral":
        from .mixtral import write_mixtral

        write_mixtral(producer, staging, layout, max_shard_bytes, bar, check)
    else:
        write_native(producer, staging, max_shard_bytes, bar, check)


__all__ = [
    "FORMATS",
    "STREAM_SHARD_BYTES",
    "Checkpoint",
    "Plan",
    "Producer",
    "Streamed",
    "convert_streaming",
    "stream",
    "write",
]
