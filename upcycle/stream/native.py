"""Streaming into upcycle's own format: what ``upcycle.save`` writes for the model in memory (``upcycle.convert`` of
the source, or ``upcycle.merge`` of several), bitwise (only shard boundaries differ), without that model in memory.

Tensors outside a converted FFN come from the producer (:mod:`.producer`) and are written under their own names;
each converted FFN's MoE layer is checked against its probe (:mod:`.check`) and written as ``<site>.moe.<name>``.
Then the record (``config.json``, ``recipe.yaml``) is written, after checking that ``upcycle.load`` rebuilds exactly
the tensors written: the skeleton it builds, on the ``meta`` device.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import check_finite
from ..export.saving import build_skeleton, write_record
from ..export.tokenizer_files import TOKENIZER_FILES
from ..layers import describe_moe
from ..record import ConversionRecord, new_record
from .check import EquivalenceCheck, check_moe
from .checkpoint import ReservingShardWriter
from .plan import meta_model
from .producer import Producer

Written = dict[str, tuple[tuple[int, ...], torch.dtype]]  # output tensor name -> (shape, dtype)
CORRUPT = "the checkpoint is corrupt; nothing was written"


def write_native(producer: Producer, staging: Path, max_shard_bytes: int, bar: tqdm,
                 check: EquivalenceCheck | None) -> None:  # fmt: skip
    plan = producer.plan
    with ReservingShardWriter(staging, max_shard_bytes) as writer:
        layers, written = stream_tensors(producer, writer, bar, check)
    # the model class is imported only now, past the memory peak: its import alone adds ~150 MB of RSS
    dense = meta_model(plan.adapter.rebuild, plan.source)
    record = new_record(plan.adapter.name, plan.source, record_dtype(dense, written), layers, origin=plan.origin,
                        **producer.recipe)  # fmt: skip
    check_written(record, written)
    write_record(staging, record)
    copy_tokenizer_files(plan.source_dir, staging)


def stream_tensors(producer: Producer, writer: ReservingShardWriter, bar: tqdm,
                   check: EquivalenceCheck | None) -> tuple[dict, Written]:  # fmt: skip
    """Write every step's output tensors; returns the MoE layers' record entries and what was written."""
    checkpoint = producer.plan.checkpoint
    layers, written = {}, {}
    layer_bytes = 0  # the previous MoE layer's size: the next one's, in a homogeneous stack
    for step, count in producer.plan.steps:
        if isinstance(step, str):
            outputs = {step: producer.backbone(step)}
        else:
            writer.reserve(layer_bytes or producer.layer_bytes(step))
            moe, probe = producer.layer(step, check)
            if check is not None:
                check_moe(check, step.name, moe, probe)
            layers[step.name] = {"index": step.index, **describe_moe(moe)}
            outputs = {f"{step.name}.moe.{name}": tensor for name, tensor in moe.state_dict().items()}
            layer_bytes = sum(tensor.numel() * tensor.element_size() for tensor in outputs.values())
            del moe  # reference counting frees it (no cycles): no gc.collect, which costs ~0.25 s a call here
        # the dense FFNs are checked as they are read; everything else is copied through, so check it here
        check_finite(outputs.items(), f"the source {checkpoint.directory}", CORRUPT)
        for name, tensor in outputs.items():
            writer.add(name, tensor)
            written[name] = (tuple(tensor.shape), tensor.dtype)
        del outputs  # the writer holds the only reference: a flushed shard frees its tensors
        bar.update(count)
    return layers, written


def copy_tokenizer_files(source_dir: Path, staging: Path) -> None:
    """The source's tokenizer files next to the weights, as ``upcycle.save`` copies them from where the model was
    read."""
    for name in TOKENIZER_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, staging / name)


def tied_groups(model: nn.Module) -> list[list[str]]:
    """State-dict names in model order, names of one tensor object (tied embeddings) grouped together."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


def check_written(record: ConversionRecord, written: Written) -> None:
    """``upcycle.load`` rebuilds the skeleton from ``record``: it must hold exactly the written tensors."""
    skeleton = meta_model(build_skeleton, record)
    state = skeleton.state_dict(keep_vars=True)
    problems = [f"{name} is not in the model" for name in written if name not in state]
    problems += [
        f"{name} {shape} is {tuple(state[name].shape)} in the model"
        for name, (shape, _) in written.items()
        if name in state and shape != tuple(state[name].shape)
    ]
    problems += [f"{group[0]} is missing" for group in tied_groups(skeleton) if not any(n in written for n in group)]
    if problems:
        raise ValueError(
            f"the checkpoint does not match the {record.source['class']} that config.json describes: "
            + "; ".join(problems[:5])
        )


def record_dtype(dense: nn.Module, written: Written) -> str:
    """``convert`` records the dtype of the model's first parameter (the token embeddings for Llama)."""
    first = next(name for name, _ in dense.named_parameters())
    dtype = written[first][1] if first in written else next(iter(written.values()))[1]
    return str(dtype).removeprefix("torch.")
