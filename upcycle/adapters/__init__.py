"""Model-family adapters: where the FFNs are, their weight layout, how to swap them, how to rebuild the model, and
every other family question (see :mod:`.base`). Adding a family is one module here, registered with
``@register_adapter``: every module of this package is imported, in name order (the order ``find_adapter`` tries)."""

import importlib as _importlib
import pkgutil as _pkgutil

from .base import Adapter, FFNSite, MoEFFN, adapter_of, all_adapters, find_adapter, get_adapter, list_adapters

for _module in sorted(m.name for m in _pkgutil.iter_modules(__path__)):
    _importlib.import_module(f"{__name__}.{_module}")  # registration side effect

__all__ = ["Adapter", "FFNSite", "MoEFFN", "adapter_of", "all_adapters", "find_adapter", "get_adapter", "list_adapters"]
