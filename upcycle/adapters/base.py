"""What an adapter declares about a model family, and the registry that finds the adapter for a model.

An adapter knows (1) where the FFNs are (``ffn_sites``, in model order), (2) their weight layout (``read_ffn`` ->
:class:`DenseFFN`), (3) their token layout and how to swap one for an MoE (``install``), (4) how to run the model
for verification and which modules to compare there (``example_inputs``, ``outputs``, ``converted_modules``,
``dense_counterpart``) and
(5) how to rebuild the dense skeleton from plain data (``describe`` / ``rebuild``) so a saved MoE loads without its
source checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..layers import MoE
from .dense_ffn import DenseFFN


@dataclass(frozen=True)
class FFNSite:
    index: int  # position among the model's FFNs, 0-based, in forward order
    name: str  # qualified name of the module replaced by the MoE


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

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def ffn_sites(self, model: nn.Module) -> list[FFNSite]:
        raise NotImplementedError

    def read_ffn(self, model: nn.Module, site: FFNSite) -> DenseFFN:
        raise NotImplementedError

    def install(self, model: nn.Module, site: FFNSite, moe: MoE) -> None:
        set_submodule(model, site.name, MoEFFN(moe))

    def converted_modules(self, model: nn.Module) -> list[str]:
        """Names of the modules a conversion replaced, in forward order: what ``upcycle.verify`` compares, layer by
        layer, with the dense model's module of the same name. By default the converted FFN sites on record."""
        record = getattr(model, "upcycle_record", None) or {}
        return list(record.get("layers", {}))

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


def get_adapter(name: str) -> Adapter:
    for adapter in _ADAPTERS:
        if adapter.name == name:
            return adapter
    raise ValueError(f"unknown adapter {name!r}; registered: {[a.name for a in _ADAPTERS]}")


def find_adapter(model: nn.Module) -> Adapter:
    for adapter in _ADAPTERS:
        if adapter.matches(model):
            return adapter
    families = "\n".join(f"  - {a.name}: {a.family}" for a in _ADAPTERS)
    raise ValueError(f"no adapter supports {type(model).__module__}.{type(model).__name__}; supported:\n{families}")


def adapter_of(model: nn.Module) -> Adapter:
    """The adapter a converted model recorded (its blocks may no longer match any adapter), else the matching one."""
    record = getattr(model, "upcycle_record", None)
    return get_adapter(record["adapter"]) if record else find_adapter(model)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def tensor_or_none(module: nn.Module | None, attribute: str) -> torch.Tensor | None:
    value = None if module is None else getattr(module, attribute, None)
    return None if value is None else value.detach()
