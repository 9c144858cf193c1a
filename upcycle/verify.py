"""``upcycle.verify``: does a converted model compute what its dense original computes?

Two measurements, both maxima over every element (a mean would hide one wrong expert among many right ones):

* **end to end**: max |moe(x) - dense(x)| over the outputs: logits (classifiers, causal LMs) or the last hidden
  state (encoders), eval mode, in fp32 (a half-precision model is compared as fp32 copies of its weights);
* **per layer**: for every module the conversion replaced (each MoE FFN, D2DMoE's attention-projection MoEs, BAM's
  Mixture of Attention; the adapter names them), max |converted(u) - dense(u)| / max |dense(u)| with u the input the
  converted module receives in the converted model's forward pass, fed to the dense module of the same name.

Why per layer: LayerScale models (CaiT, DeiT III, DINOv2, ConvNeXt; Touvron et al., arXiv 2103.17239) multiply each
residual branch by ~1e-5 at initialisation, so a converted FFN that outputs zeros moves the logits by less than
1e-4 and the end-to-end difference alone cannot tell a broken conversion from a correct one. A layer's own output,
taken before its LayerScale and relative to its own size, can.

A method that claims dense equivalence (copies with renormalised top-k, a neuron split with all experts active,
BTX / BAM of one branch) gives ~1e-6 on both in fp32.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .adapters import find_adapter, get_adapter
from .record import copy_model, record_of

TINY = torch.finfo(torch.float32).tiny  # floor of the relative scale: an all-zero dense output must stay zero


class Verification(float):
    """The end-to-end max |moe - dense| (the float value itself, which ``verify`` has always returned) and each
    converted layer's relative difference (``per_layer``, by module name, in forward order)."""

    def __new__(cls, end_to_end: float, per_layer: dict[str, float]):
        self = super().__new__(cls, end_to_end)
        self.end_to_end, self.per_layer = float(end_to_end), dict(per_layer)
        return self

    def __getnewargs__(self):  # copy / pickle rebuild through __new__
        return self.end_to_end, self.per_layer

    @property
    def worst_layer(self) -> str | None:
        """The layer with the largest relative difference (a NaN counts as the largest); None without layers."""
        return max(self.per_layer, key=lambda name: (math.isnan(self.per_layer[name]), self.per_layer[name]),
                   default=None)  # fmt: skip

    @property
    def worst_relative(self) -> float:
        return self.per_layer[self.worst_layer] if self.per_layer else 0.0

    def passed(self, atol: float = 1e-4, rtol: float = 1e-4) -> bool:
        """End to end within ``atol`` and every layer within ``rtol`` (NaN fails both)."""
        return self.end_to_end <= atol and all(value <= rtol for value in self.per_layer.values())

    def summary(self) -> str:
        layer = f"worst layer {self.worst_layer}: {self.worst_relative:.3e} relative" if self.per_layer else "no layers"
        return f"end to end {self.end_to_end:.3e}, {layer}"

    def __repr__(self) -> str:
        return f"Verification({self.summary()})"


@torch.no_grad()
def verify(moe_model: nn.Module, dense_model: nn.Module, inputs: dict | torch.Tensor | None = None,
           seed: int = 0) -> Verification:  # fmt: skip
    """Compare ``moe_model`` with ``dense_model`` on ``inputs`` (a dict of model inputs or an image batch; random
    inputs from ``seed`` if None): end to end and layer by layer, see the module docstring. The result is a float
    (the end-to-end max |moe - dense|) carrying ``per_layer``, ``worst_layer`` and ``passed(atol, rtol)``."""
    record = record_of(moe_model)  # a converted model's blocks may match no adapter: its record names one
    if _dtype(moe_model) != torch.float32 or _dtype(dense_model) != torch.float32:
        # half-precision rounding (~1e-2) would hide a wrong conversion or fail a right one: compare in fp32 what the
        # stored weights compute
        moe_model, dense_model = copy_model(moe_model).float(), copy_model(dense_model).float()
    adapter = get_adapter(record.adapter) if record is not None and record.adapter else find_adapter(dense_model)
    if inputs is None:
        inputs = adapter.example_inputs(dense_model, generator=torch.Generator().manual_seed(seed))
    elif isinstance(inputs, torch.Tensor):
        inputs = {"x": inputs} if adapter.task == "image_classification" else {"input_ids": inputs}
    names = adapter.converted_modules(moe_model)
    dense_modules = {name: adapter.dense_counterpart(dense_model, name) for name in names}
    modes = moe_model.training, dense_model.training
    moe_model.eval()
    dense_model.eval()
    try:
        calls = {name: [] for name in names}  # each dense call: (argument structure, output)
        with _hooks(dense_modules, lambda name, args, kwargs, out: calls[name].append((_structure(args, kwargs), out))):
            reference = adapter.outputs(dense_model, inputs).float()
        per_layer = dict.fromkeys(names, 0.0)
        seen = dict.fromkeys(names, 0)

        def compare(name: str, args: tuple, kwargs: dict, out) -> None:
            index, seen[name] = seen[name], seen[name] + 1
            if index < len(calls[name]) and calls[name][index][0] != _structure(args, kwargs):
                expected = calls[name][index][1]  # other signatures (BAM attention, HF seed): the dense pass's output
            else:  # exact: the dense computation on the converted module's own input
                expected = dense_modules[name](*args, **kwargs)
            per_layer[name] = max(per_layer[name], _relative(_tensor(out), _tensor(expected), name))

        moe_modules = {name: moe_model.get_submodule(name) for name in names}
        with _hooks(moe_modules, compare):
            converted = adapter.outputs(moe_model, inputs).float()
    finally:
        moe_model.train(modes[0])
        dense_model.train(modes[1])
    if converted.shape != reference.shape:
        raise ValueError(f"output shapes differ: converted {tuple(converted.shape)} vs dense {tuple(reference.shape)}")
    return Verification(float((converted - reference).abs().max()), per_layer)


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


class _hooks:
    """Forward hooks ``fn(name, args, kwargs, output)`` on ``modules`` for the duration of a ``with`` block."""

    def __init__(self, modules: dict[str, nn.Module], fn):
        self.modules, self.fn, self.handles = modules, fn, []

    def __enter__(self):
        for name, module in self.modules.items():
            hook = lambda _, args, kwargs, out, name=name: self.fn(name, args, kwargs, out)  # noqa: E731
            self.handles.append(module.register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *_):
        for handle in self.handles:
            handle.remove()


def _structure(args: tuple, kwargs: dict) -> tuple:
    """How a module was called: the number of positional arguments and the keyword names."""
    return len(args), tuple(sorted(kwargs))


def _tensor(output) -> torch.Tensor:
    """A module's main output: itself, or the first tensor of a tuple (Hugging Face attention returns weights too)."""
    if isinstance(output, torch.Tensor):
        return output
    return next(item for item in output if isinstance(item, torch.Tensor))


def _relative(converted: torch.Tensor, dense: torch.Tensor, name: str) -> float:
    """max |converted - dense| / max |dense|, both maxima over every element."""
    if converted.shape != dense.shape:
        raise ValueError(f"{name}: output shapes differ: converted {tuple(converted.shape)} vs dense "
                         f"{tuple(dense.shape)}")  # fmt: skip
    scale = max(float(dense.float().abs().max()), TINY) if dense.numel() else TINY
    return float((converted.float() - dense.float()).abs().max()) / scale if dense.numel() else 0.0
