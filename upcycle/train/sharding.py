"""How N processes share a training run: ``ddp`` replicates the model on every process (DistributedDataParallel);
``fsdp`` shards parameters, gradients and optimizer state across them (PyTorch FSDP2, ``fully_shard``), for LMs
whose replicas do not fit.

Under FSDP each repeated block (a transformer layer) is its own shard group, gathered just before it runs and freed
after, and checkpoints hold full, unsharded tensors, so a run checkpointed under one strategy or process count
resumes under another. Gathering is collective: every process calls :func:`full_model_state` and
:func:`full_optimizer_state`; only the main process receives the tensors (in CPU memory).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..record import record_of
from .distributed import Context


def wrap(model: nn.Module, strategy: str, context: Context) -> nn.Module:
    """The module the training step calls. FSDP changes ``model`` in place (its parameters become shards)."""
    if not context.distributed:
        return model
    if strategy == "ddp":
        return DistributedDataParallel(model, find_unused_parameters=True)  # unselected experts get no gradient
    from torch.distributed.fsdp import fully_shard

    from ..adapters.base import ensure_record

    ensure_record(model)  # recorded while the model is whole: the final save rebuilds it from the record
    for block in repeated_blocks(model):
        fully_shard(block)
    fully_shard(model)  # the rest (embeddings, head, final norm) forms the root group
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The children of every ModuleList / Sequential made of ≥ 2 modules of one class with parameters (transformer
    layers, ViT blocks, ConvNeXt stages); the outermost such lists only."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside or not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(module.children())
        same_class = len({type(child) for child in children}) == 1
        if len(children) >= 2 and same_class and any(True for _ in children[0].parameters()):
            found.extend(children)
            inside.update(id(sub) for child in children for sub in child.modules())
    return found


def gradient_sync(network: nn.Module, enabled: bool):
    """A context in which backward does (enabled) or does not (accumulation micro-steps) reduce gradients."""
    if enabled:
        return nullcontext()
    if isinstance(network, DistributedDataParallel):
        return network.no_sync()
    if is_sharded(network):
        return _fsdp_no_sync(network)
    return nullcontext()


@contextmanager
def _fsdp_no_sync(network):
    network.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        network.set_requires_gradient_sync(True)


def gathered_model(model: nn.Module, context: Context) -> nn.Module | None:
    """The trained model whole on the main process (None elsewhere): ``model`` itself unless it is sharded, then an
    unsharded copy rebuilt from its record and filled with the gathered tensors. Collective under FSDP."""
    if not is_sharded(model):
        return model if context.is_main else None
    state = full_model_state(model)
    if not context.is_main:
        return None
    from ..export.saving import build_skeleton, load_weights

    whole = build_skeleton(copy.deepcopy(record_of(model)))  # the record, with the tokenizer files' folder, too
    load_weights(whole, state, "the gathered FSDP shards")
    return whole


def _options(model: nn.Module):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    sharded = is_sharded(model)
    return StateDictOptions(full_state_dict=sharded, cpu_offload=sharded)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full state dict (on the main process; empty on the others under FSDP)."""
    if not is_sharded(model):
        from ..export.saving import unique_state

        return unique_state(model)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(model))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter name (not position), the same under every strategy."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(model))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore what :func:`full_optimizer_state` wrote; every process reads the whole state and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=is_sharded(model)))
