"""What an adapter declares about a model family, and the registry that finds the adapter for a model.

An adapter knows (1) where the FFNs are (``ffn_sites``, in model order), (2) their weight layout (``read_ffn`` ->
:class:`DenseFFN`), (3) their token layout and how to swap one for an MoE (``install``), (4) how to run the model
for verification and which modules to compare there (``example_inputs``, ``outputs``, ``converted_modules``,
``dense_counterpart``) and
(5) how to rebuild the dense skeleton from plain data (``describe`` / ``rebuild``) so a saved MoE loads without its
source checkpoint, and (6) every other family question the rest of upcycle asks, so that no list of families lives
anywhere else: which export formats store the family exactly, whether streaming and merging apply, where an FFN's
activation sits, which modules an FFN spans, how a method reshapes the attention (D2DMoE §3.4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import UserError
from ..layers import MoE, moe_layers
from ..record import ConversionRecord, attach_record, dtype_name, new_record, record_of
from .dense_ffn import DenseFFN


@dataclass(frozen=True)
class FFNSite:
    index: int  # position among the model's FFNs, 0-based, in forward order
    name: str  # qualified name of the module replaced by the MoE


@dataclass(frozen=True)
class CheckpointLayout:
    """Where a family's FFN tensors sit in a safetensors checkpoint: what ``upcycle.stream`` needs to convert one
    FFN at a time from the headers and config.json, without building the model."""

    base: str  # prefix of the transformer stack in a task model ("model."); a bare base model has none
    layers: str  # the stack's name: tensors are "<base><layers>.<i>.…"
    ffn: str  # the FFN site under each layer
    tensors: dict[str, str]  # DenseFFN field -> tensor name under the site (an absent bias is simply missing)
    shapes: Callable[[dict], dict[str, tuple[int, ...]]]  # config.json -> the shape each required tensor must have
    activation_key: str  # config.json key that names the FFN activation


class MoEFFN(nn.Module):
    """The module an adapter installs in place of an FFN: the MoE plus the FFN's token layout and dropout.

    ``channels_first``: inputs are ``[b, d, H, W]`` (1×1-conv MLPs); the MoE sees ``[b, H, W, d]``.
    """

    def __init__(self, moe: MoE, channels_first: bool = False, dropout: float = 0.0):
        super().__init__()
        self.moe, self.channels_first = moe, channels_first
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_first:
            return self.dropout(self.moe(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        return self.dropout(self.moe(x))


class Adapter:
    name: ClassVar[str]
    family: ClassVar[str]  # human-readable list of what it covers
    task: ClassVar[str]  # "image_classification", "causal_lm" or "encoder"
    export_formats: ClassVar[tuple[str, ...]] = ()  # formats that store its converted models exactly, preferred first
    generic_format: ClassVar[str | None] = None  # the format that stores any model of the family, tried last
    streaming_model_types: ClassVar[tuple[str, ...]] = ()  # config.json model_type values upcycle.stream converts
    checkpoint_layout: ClassVar[CheckpointLayout | None] = None  # their tensor layout (with streaming_model_types)
    merge_model_types: ClassVar[tuple[str, ...]] = ()  # model types upcycle.merge (BTX, BAM) mixes
    block_modules: ClassVar[dict[str, str]] = {}  # "ffn" / "attention" -> its module name in a layer (merge)
    attention_projections: ClassVar[tuple[str, ...]] = ()  # Q, K, V, O module names under the attention (merge)
    activation_attribute: ClassVar[str] = "act"  # the FFN module's attribute that holds its activation module

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def refusal(self, model: nn.Module) -> str | None:
        """Why ``model``, which no adapter matches, cannot be converted, when this adapter's ecosystem can tell (it
        has no FFN, or only FFNs that mix tokens); None leaves the generic message. ``find_adapter`` asks."""
        return None

    def ffn_sites(self, model: nn.Module) -> list[FFNSite]:
        raise NotImplementedError

    def read_ffn(self, model: nn.Module, site: FFNSite) -> DenseFFN:
        raise NotImplementedError

    def install(self, model: nn.Module, site: FFNSite, moe: MoE) -> None:
        set_submodule(model, site.name, MoEFFN(moe))

    def folded_tensors(self, model: nn.Module, site: FFNSite) -> list[str]:
        """Names of the tensors at ``site`` that ``read_ffn`` folds into new tensors (a BatchNorm into a linear
        layer) rather than returning views of: ``upcycle.convert`` counts them as mapped. Every other tensor that a
        conversion removes must be a view in the :class:`DenseFFN` (no silent drops)."""
        return []

    def converted_modules(self, model: nn.Module) -> list[str]:
        """Names of the modules a conversion replaced, in forward order: what ``upcycle.verify`` compares, layer by
        layer, with the dense model's module of the same name. By default the converted FFN sites on record."""
        record = record_of(model)
        return list(record.layers) if record is not None else []

    def dense_counterpart(self, dense_model: nn.Module, name: str) -> nn.Module:
        """The dense computation that the converted module ``name`` replaced, callable as it is: by default the
        dense model's module of the same name."""
        try:
            return dense_model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"the dense model has no module {name!r}, which the conversion replaced: compare with the model that "
                "was converted (for D2DMoE attention projections, the one whose projections are already MLPs)"
            ) from None

    def ffn_modules(self, model: nn.Module) -> set[str]:
        """Every module that computes part of a dense FFN (what a FLOP count charges to the FFN): the sites."""
        return {site.name for site in self.ffn_sites(model)}

    def activation_module(self, model: nn.Module, site: FFNSite) -> nn.Module | None:
        """The activation module of the dense FFN at ``site``; None once the site is an MoE layer."""
        module = getattr(model.get_submodule(site.name), self.activation_attribute, None)
        return module if isinstance(module, nn.Module) else None

    def swap_activations_to_relu(self, model: nn.Module) -> int:
        """Put ``nn.ReLU`` in every dense FFN, in place, and record it so the model rebuilds as a ReLU model;
        returns how many FFNs changed."""
        swapped = 0
        for site in self.ffn_sites(model):
            if self.activation_module(model, site) is not None:
                setattr(model.get_submodule(site.name), self.activation_attribute, nn.ReLU())
                swapped += 1
        if swapped:
            self.record_activation(model, "relu")
        return swapped

    def record_activation(self, model: nn.Module, activation: str) -> None:
        """Make ``describe(model)`` rebuild the FFNs with ``activation`` (a Hugging Face ``hidden_act`` name)."""
        raise ValueError(f"{self.family}: changing the FFN activation is not supported")

    def export_refusal(self, model: nn.Module, target: str) -> str | None:
        """Why ``model`` cannot be exported as ``target``, or None when ``target`` stores it exactly."""
        if target in self.export_formats or target == self.generic_format:
            return None
        known = [*self.export_formats, *([self.generic_format] if self.generic_format else [])]
        formats = " or ".join(repr(f) for f in known) or "no format (upcycle.save / load keep them)"
        return f"models of the {self.name!r} adapter export as {formats}"

    def with_classifier(self, model: nn.Module, num_labels: int) -> nn.Module:
        """``model`` with a fresh classification head of ``num_labels`` classes (added, or replacing the one it has),
        its record updated so it saves and reloads with that head; the body, MoE layers included, is kept."""
        raise ValueError(f"{self.family}: giving the model a classification head is not supported")

    def mean_pool_readout(self, model: nn.Module) -> tuple[dict, list[str]]:
        """Swap a class-token readout for mean pooling over the patch tokens into a fresh norm (MoE Jetpack's
        released code, arXiv 2406.04801), in place; returns the description's new build arguments and the tensors
        dropped."""
        raise ValueError(f"{self.family}: a mean-pool readout is not supported; use readout=class_token")

    def replace_attention_projections(self, model: nn.Module, hidden_ratio: float = 0.5,
                                      generator: torch.Generator | None = None) -> nn.Module:  # fmt: skip
        """D2DMoE §3.4: every attention projection becomes an equal-cost ReLU MLP (read as an FFN site after)."""
        raise ValueError(f"{self.family}: replacing attention projections by MLPs is not supported")

    def attention_projection_pairs(self, model: nn.Module, teacher: nn.Module) -> list[tuple]:
        """(MLP name, the MLP, the teacher's projection name, which third of its output or None) for every projection
        MLP of ``model``, in forward order: what the distillation trains against the dense ``teacher``."""
        raise ValueError(f"{self.family}: the model has no attention projections replaced by MLPs")

    def example_inputs(self, model: nn.Module, batch: int = 2, generator: torch.Generator | None = None) -> dict:
        raise NotImplementedError

    def outputs(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        raise NotImplementedError

    def describe(self, model: nn.Module) -> dict:
        raise NotImplementedError

    def rebuild(self, description: dict) -> nn.Module:
        raise NotImplementedError


_ADAPTERS: list[Adapter] = []


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    _ADAPTERS.append(cls())
    return cls


def list_adapters() -> list[dict[str, str]]:
    return [{"name": a.name, "family": a.family, "task": a.task} for a in _ADAPTERS]


def all_adapters() -> list[Adapter]:
    return list(_ADAPTERS)


def get_adapter(name: str) -> Adapter:
    for adapter in _ADAPTERS:
        if adapter.name == name:
            return adapter
    raise ValueError(f"unknown adapter {name!r}; registered: {[a.name for a in _ADAPTERS]}")


def find_adapter(model: nn.Module) -> Adapter:
    for adapter in _ADAPTERS:
        if adapter.matches(model):
            return adapter
    for adapter in _ADAPTERS:
        reason = adapter.refusal(model)
        if reason is not None:
            raise UserError(reason)
    families = "\n".join(f"  - {a.name}: {a.family}" for a in _ADAPTERS)
    raise ValueError(f"no adapter supports {type(model).__module__}.{type(model).__name__}; supported:\n{families}")


def adapter_of(model: nn.Module) -> Adapter:
    """The adapter a converted model recorded (its blocks may no longer match any adapter), else the matching one."""
    record = record_of(model)
    return get_adapter(record.adapter) if record is not None and record.adapter else find_adapter(model)


def ensure_record(model: nn.Module) -> ConversionRecord:
    """The model's record, completed: a dense model gets one with no MoE layers (keeping where it came from), so it
    saves and loads the same way."""
    record = record_of(model)
    if record is None or record.adapter is None:
        if moe_layers(model):
            raise ValueError(
                "the model has MoE layers but no conversion record (copy.deepcopy does not copy it: copy a converted "
                "model with upcycle.copy_model); convert, merge or load it again"
            )
        adapter = find_adapter(model)
        record = attach_record(
            model, new_record(adapter.name, adapter.describe(model), dtype_name(model), origin=record)
        )
    return record


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def tensor_or_none(module: nn.Module | None, attribute: str) -> torch.Tensor | None:
    value = None if module is None else getattr(module, attribute, None)
    return None if value is None else value.detach()
