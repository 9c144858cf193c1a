"""Streaming straight into a Hugging Face Mixtral checkpoint (arXiv 2401.04088): the tensors, names, config and
files that ``upcycle export --format mixtral`` writes for the model ``upcycle convert SOURCE`` makes, with neither
model in memory.

The Mixtral exporter (:mod:`upcycle.export.mixtral`) decides everything about the format. It is handed the
converted model's *skeleton*: built from the record the conversion makes, with storage allocated but never written
(untouched pages cost no memory), it gives the exporter's refusals, the config, the export note and the names of
the backbone tensors, each read from the source checkpoint as it is written. Every MoE layer goes through the
exporter's ``moe_tensors`` as the method produces it. The record's per-layer description comes from converting the
first FFN once up front, so everything is refused before anything is written; each streamed layer must match it.

Each layer's Mixtral tensors, as they are about to be written, are loaded into transformers' own
``MixtralSparseMoeBlock`` and checked against the dense FFN (:mod:`.check`), so the check covers the exporter's names
and layout too, not only the layer in hand.
"""

from __future__ import annotations

import copy
import inspect
import shutil
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import check_finite
from ..export.hf_moe_common import backbone_tensors, export_note, read_source, write_checkpoint
from ..export.mixtral import TARGET, export_mixtral, mixtral_config, moe_tensors
from ..export.saving import build_skeleton
from ..export.shards import INDEX, SINGLE
from ..layers import describe_moe
from ..record import new_record
from .check import EquivalenceCheck, Probe
from .checkpoint import ReservingShardWriter
from .native import CORRUPT, tied_groups
from .plan import Plan, first_dtype, meta_model
from .producer import Producer

FILES = ".files"  # the exporter's own writer puts config, note and tokenizer files here, then they move up


def write_mixtral(producer: Producer, staging: Path, layout: str | None, max_shard_bytes: int, bar: tqdm,
                  check: EquivalenceCheck | None) -> None:  # fmt: skip
    layout = layout or inspect.signature(export_mixtral).parameters["layout"].default  # the exporter's default
    spec = producer.layer_spec()
    exported = read_source(skeleton(producer, spec), TARGET, "mixtral")  # refuses what Mixtral cannot express
    config = mixtral_config(exported)
    outputs_of = backbone_sources(producer.plan, exported.model, [name for name, _ in backbone_tensors(exported)])
    block_config = copy.deepcopy(config)  # the exported config stays as the exporter made it
    block_config._experts_implementation = "eager"  # transformers' reference loop: what the weights compute
    with ReservingShardWriter(staging, max_shard_bytes) as writer:
        stream_layers(producer, writer, bar, layout, spec, outputs_of, check and LayerCheck(check, block_config))
    note = export_note(exported, "mixtral", layout=layout)
    write_checkpoint(staging / FILES, config, [], exported, note, overwrite=False)
    for path in (staging / FILES).iterdir():
        if path.name not in (SINGLE, INDEX):  # the weights are ours; an empty model.safetensors is theirs
            shutil.move(path, staging / path.name)
    shutil.rmtree(staging / FILES)


def skeleton(producer: Producer, spec: dict) -> nn.Module:
    """The converted model ``upcycle.load`` would rebuild from the record of the model in memory, its tensors
    allocated on the CPU but never written, so they occupy no memory (the exporter tells tied tensors by their
    storage). Every layer is described as the first one converts (one method, FFNs of one shape)."""
    plan = producer.plan
    dtype = first_dtype(plan)
    layers = {site.name: {"index": site.index, **spec} for site in plan.sites}
    record = new_record(plan.adapter.name, plan.source, str(dtype).removeprefix("torch."), layers,
                        origin=plan.origin, **producer.recipe)  # fmt: skip
    model = meta_model(build_skeleton, record).to_empty(device="cpu")
    model.tie_weights()  # to_empty gives every parameter its own storage; tie what the config ties, as loading does
    return model


def backbone_sources(plan: Plan, model: nn.Module, names: list[str]) -> dict[str, list[str]]:
    """Source tensor -> the output names the exporter writes it under (a tied head: the embeddings' tensor). Every
    source tensor outside the converted FFNs must have one: nothing is dropped silently."""
    tensors = plan.checkpoint.tensors
    tied = {name: group for group in tied_groups(model) for name in group}
    outputs_of: dict[str, list[str]] = {}
    missing = []
    for name in names:
        found = next((n for n in [name, *tied.get(name, [])] if n in tensors), None)
        if found is None:
            missing.append(name)
        else:
            outputs_of.setdefault(found, []).append(name)
    if missing:
        raise ValueError(f"{plan.source_dir} lacks tensors that the Mixtral checkpoint needs: {missing[:5]}")
    dropped = [step for step, _ in plan.steps if isinstance(step, str) and step not in outputs_of]
    if dropped:
        raise ValueError(f"{plan.source_dir} holds tensors that a Mixtral checkpoint has no place for: {dropped[:5]}; "
                         "convert without --export (upcycle's own format keeps every tensor)")  # fmt: skip
    return outputs_of


def stream_layers(producer: Producer, writer: ReservingShardWriter, bar: tqdm, layout: str, spec: dict,
                  outputs_of: dict[str, list[str]], check: LayerCheck | None) -> None:  # fmt: skip
    """Write every tensor under its Mixtral name, each MoE layer checked first as it will be written."""
    plan = producer.plan
    layer_bytes = 0  # the previous MoE layer's size: the next one's, in a homogeneous stack
    for step, count in plan.steps:
        if isinstance(step, str):
            tensor = producer.backbone(step)
            # safetensors refuses two names on one storage: a second name (a tied head) gets its own copy
            outputs = [(name, tensor if k == 0 else tensor.clone()) for k, name in enumerate(outputs_of[step])]
        else:
            writer.reserve(layer_bytes or producer.layer_bytes(step))
            moe, probe = producer.layer(step, check and check.check)
            if describe_moe(moe) != spec:
                raise ValueError(f"{step.name} converts to a different MoE layer than {plan.sites[0].name}; a Mixtral "
                                 "config holds one shape for all layers")  # fmt: skip
            outputs = list(moe_tensors(step.index, moe, layout))
            del moe
            if check is not None:
                check(step.name, dict(outputs), probe)
            layer_bytes = sum(tensor.numel() * tensor.element_size() for _, tensor in outputs)
        check_finite(outputs, f"the source {plan.checkpoint.directory}", CORRUPT)
        for name, tensor in outputs:
            writer.add(name, tensor)
        del outputs  # the writer holds the only reference: a flushed shard frees its tensors
        bar.update(count)


class LayerCheck:
    """One Mixtral layer's tensors, exactly as they are about to be written, loaded into transformers' own
    ``MixtralSparseMoeBlock`` and compared with the dense FFN's probe: the check covers the exporter's names and
    layout, not only the layer in hand, without reading the output back from disk."""

    def __init__(self, check: EquivalenceCheck, config):
        self.check, self.config = check, config

    def __call__(self, name: str, tensors: dict[str, torch.Tensor], probe: Probe) -> None:
        block, e = mixtral_block(self.config, tensors, name), self.config.num_local_experts

        def each_expert(x: torch.Tensor) -> torch.Tensor:  # [t, d] -> [e, t, d]
            t = x.shape[0]
            choice = torch.arange(e).repeat_interleave(t)[:, None]  # [e*t, 1]: expert j gets the j-th copy of x
            return block.experts(x.repeat(e, 1), choice, torch.ones(e * t, 1)).reshape(e, t, -1)  # [e*t, d] first

        def whole(x: torch.Tensor) -> torch.Tensor:  # [t, d] -> [t, d]
            return block(x[None])[0]  # the block takes [b, n, d]

        self.check.compare(name, probe, whole, each_expert)


def mixtral_block(config, tensors: dict[str, torch.Tensor], where: str) -> nn.Module:
    """transformers' ``MixtralSparseMoeBlock`` (float32) holding one layer's Mixtral tensors, in either layout."""
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    router = next(name for name in tensors if name.endswith(".gate.weight") and ".experts." not in name)
    prefix = router.removesuffix("gate.weight")
    local = {name.removeprefix(prefix): tensor.float() for name, tensor in tensors.items()}
    if "experts.gate_up_proj" not in local:
        local = fused_from_legacy(local, config.num_local_experts, where)
    block = MixtralSparseMoeBlock(config).float()
    try:
        block.load_state_dict(local)
    except RuntimeError as error:
        raise ValueError(f"the exported {where} does not load into transformers' Mixtral block: {error}") from None
    return block.eval()


def fused_from_legacy(local: dict[str, torch.Tensor], num_experts: int, where: str) -> dict[str, torch.Tensor]:
    """What transformers does to the published layout at load (conversion_mapping.py, "mixtral"): w1 and w3 stacked
    over experts and concatenated along dim 1, gate rows first ([e, 2h, d]); w2 stacked ([e, d, h])."""
    try:
        stacked = {w: torch.stack([local.pop(f"experts.{j}.{w}.weight") for j in range(num_experts)])
                   for w in ("w1", "w2", "w3")}  # fmt: skip
    except KeyError as error:
        raise ValueError(f"the exported {where} lacks expert tensor {error}") from None
    gate_up = torch.cat([stacked["w1"], stacked["w3"]], dim=1)  # [e, 2h, d]
    return {
        **local,
        "experts.gate_up_proj": gate_up,
        "experts.down_proj": stacked["w2"],
    }  # anything else left in local fails the strict load
