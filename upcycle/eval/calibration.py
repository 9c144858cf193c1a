"""Calibration for recycling methods that look at data: a few training examples of a dataset, and the inputs each
FFN site receives on them.

Methods that carve experts from activations (CMoE) or draw router rows from hidden states (routers initialised
from data) start here; MoE Jetpack keeps its own running statistics (``methods/jetpack/calibration.py``) because it
needs only sums over millions of tokens, not the tokens themselves.

Calibration always reads the *train* split of a dataset (a built-in set or the user's, through the same loaders as
training), never a held-out one. Dimension letters: n examples, t tokens (positions of all examples), d model width.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace

import torch
from torch import nn
from tqdm.auto import tqdm


def calibration_inputs(model: nn.Module, adapter, data: str, examples: int, seq_len: int = 128) -> torch.Tensor:
    """The first ``examples`` training examples of ``data`` as the model takes them: images ``[n, c, H, W]`` at its
    input size, or token ids ``[n, seq_len]`` from its own tokenizer."""
    from .tasks import CausalLM, image_dataset

    if examples < 1:
        raise ValueError(f"calibration needs at least one example, got {examples}")
    if adapter.task == "image_classification":  # whatever the head's classes: only the inputs count
        dataset = image_dataset(model, data, "train")
    else:  # any text model reads packed blocks of its own tokens
        settings = SimpleNamespace(data=data, seq_len=seq_len, seed=0, data_options={})
        dataset = CausalLM(model, adapter, settings).dataset("train")
    count = min(examples, len(dataset))
    first = dataset[0]
    key = "x" if "x" in first else "input_ids"
    return torch.stack([dataset[i][key] for i in range(count)])


def collect_ffn_inputs(model: nn.Module, adapter, sites: Iterable[str], inputs: torch.Tensor, batch_size: int = 8,
                       max_tokens: int | None = None, progress: bool = False) -> dict[str, torch.Tensor]:  # fmt: skip
    """What each named FFN site receives when ``model`` runs on ``inputs``: ``{site: [t, d]}`` in fp32, every
    position of every example (``max_tokens``: an evenly spaced subset of at most that many rows).

    The model runs in eval mode (no dropout) and gets its training flag back afterwards."""
    available = {site.name for site in adapter.ffn_sites(model)}
    names = list(sites)
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(f"unknown FFN sites {unknown}; the model has {sorted(available)}")
    modules = {name: model.get_submodule(name) for name in names}
    return record_inputs(model, modules, inputs, batch_size, max_tokens, progress)


@torch.no_grad()
def record_inputs(model: nn.Module, modules: dict[str, nn.Module], inputs: torch.Tensor, batch_size: int = 8,
                  max_tokens: int | None = None, progress: bool = False) -> dict[str, torch.Tensor]:  # fmt: skip
    """``{name: [t, d]}``: the first input of each of ``modules`` (inside ``model``) while ``model`` runs on
    ``inputs`` in eval mode, channels last (a module with 1×1 convolutions takes ``[b, d, H, W]``)."""
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    hooks = []
    for name, module in modules.items():
        channels_first = any(isinstance(m, nn.Conv2d) for m in module.modules())  # 1×1-conv MLPs (ConvNeXt)

        def record(module, args, output, name=name, channels_first=channels_first):
            x = args[0].movedim(1, -1) if channels_first else args[0]  # [b, d, H, W] -> [b, H, W, d]
            rows[name].append(x.reshape(-1, x.shape[-1]).float().cpu())  # [t, d]

        hooks.append(module.register_forward_hook(record))
    run_hooked(model, hooks, inputs, batch_size, progress)
    result = {}
    for name in modules:
        x = torch.cat(rows[name])  # [t, d]
        if max_tokens is not None and x.shape[0] > max_tokens:
            x = x[torch.linspace(0, x.shape[0] - 1, max_tokens).long()]
        result[name] = x
    return result


@torch.no_grad()
def run_hooked(model: nn.Module, hooks: list, inputs: torch.Tensor, batch_size: int, progress: bool = False) -> None:
    """Run ``model`` on ``inputs`` in batches in eval mode (no dropout) for its forward ``hooks`` to see, then remove
    the hooks and give the model its training flag back, whatever happens."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, inputs.shape[0], batch_size), desc="calibration", disable=not progress):
            model(inputs[start : start + batch_size].to(device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
