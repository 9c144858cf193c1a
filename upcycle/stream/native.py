"""Streaming into upcycle's own format: what ``upcycle.save(upcycle.convert(model, config))`` writes, bitwise (only
shard boundaries differ), without the model in memory.

Tensors outside a converted FFN are copied through; each converted FFN is read whole, turned into an MoE layer by
the registered method, checked against the dense FFN (:mod:`.check`) and written as ``<site>.moe.<name>``. Layers are
converted in increasing index order with one ``torch.Generator`` seeded with ``config.seed``, as ``convert`` does.
Then the record (``config.json``, ``recipe.yaml``) is written, after checking that ``upcycle.load`` rebuilds exactly
the tensors written: the skeleton it builds, on the ``meta`` device.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import RUNTIME_FIELDS
from ..errors import check_finite
from ..export.saving import build_skeleton, write_record
from ..layers import MoE, describe_moe
from ..record import ConversionRecord, new_record
from .check import EquivalenceCheck
from .checkpoint import ReservingShardWriter
from .plan import Plan, convert_ffn, ffn_bytes, meta_model, read_dense_ffn

Written = dict[str, tuple[tuple[int, ...], torch.dtype]]  # output tensor name -> (shape, dtype)
CORRUPT = "the checkpoint is corrupt; nothing was written"


def write_native(plan: Plan, staging: Path, max_shard_bytes: int, bar: tqdm, check: EquivalenceCheck | None) -> None:
    with ReservingShardWriter(staging, max_shard_bytes) as writer:
        layers, written = stream_tensors(plan, writer, bar, check)
    # the model class is imported only now, past the memory peak: its import alone adds ~150 MB of RSS
    dense = meta_model(plan.adapter.rebuild, plan.source)
    record = new_record(plan.adapter.name, plan.source, record_dtype(dense, written), layers,
                        convert=plan.cfg.model_dump(exclude=RUNTIME_FIELDS), origin=plan.origin)  # fmt: skip
    check_written(record, written)
    write_record(staging, record)


def stream_tensors(plan: Plan, writer: ReservingShardWriter, bar: tqdm,
                   check: EquivalenceCheck | None) -> tuple[dict, Written]:  # fmt: skip
    """Write every step's output tensors; returns the MoE layers' record entries and what was written."""
    checkpoint, cfg = plan.checkpoint, plan.cfg
    generator = torch.Generator().manual_seed(cfg.seed)
    layers, written = {}, {}
    layer_bytes = 0  # the previous MoE layer's size: the next one's, in a homogeneous stack
    for step, count in plan.steps:
        if isinstance(step, str):
            outputs = checkpoint.read([step])
        else:
            writer.reserve(layer_bytes or cfg.num_experts * ffn_bytes(checkpoint, step))
            dense = read_dense_ffn(checkpoint, step, plan.activation, plan.layout)
            moe = convert_ffn(dense, step, cfg, generator)
            if check is not None:
                check_moe(check, step.name, dense, moe)
            del dense  # freed before its experts join the pending shard
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


def check_moe(check: EquivalenceCheck, name: str, dense, moe: MoE) -> None:
    """The MoE layer in hand against its dense FFN: what is written is its state dict, bitwise."""
    moe = moe if moe.experts.w_up.dtype == torch.float32 else copy.deepcopy(moe).float()
    experts = moe.experts
    copies = experts.d_hidden == dense.d_hidden and moe.shared_expert is None and experts.shared_bias is None

    def each_expert(x: torch.Tensor) -> torch.Tensor:  # [t, d] -> [e, t, d]
        return experts.forward_stacked(x.expand(experts.num_experts, *x.shape))

    check.layer(name, dense, moe, each_expert if copies else None)


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
