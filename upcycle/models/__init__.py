"""upcycle's own model classes, usable through transformers' Auto API.

    from upcycle.models import UpcycleLMConfig, UpcycleLMForCausalLM
    model = UpcycleLMForCausalLM(UpcycleLMConfig(hidden_size=64, intermediate_size=192, num_attention_heads=4))
    model.save_pretrained("lm/")
    model = transformers.AutoModelForCausalLM.from_pretrained("lm/")

Importing this package imports nothing from transformers: a first ``import transformers.modeling_utils`` costs
seconds, and most uses of upcycle (timm models, the CLI) never need it. The classes load on first attribute access
(PEP 562), and each module registers its classes with transformers' Auto API when it loads (``lm_config``:
``AutoConfig``; ``lm``: ``AutoModel``, ``AutoModelForCausalLM``). ``register_on_transformers_import()`` also
loads them right after transformers' own Auto modules load, so ``AutoConfig`` / ``AutoModelForCausalLM
.from_pretrained(dir)`` know ``model_type="upcycle_lm"`` and ``"upcycle_bam"`` without anyone importing
``upcycle.models`` first.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import sys
import warnings
from collections.abc import Callable

# Public name -> the submodule that defines it (and registers it with the Auto API on import).
_LAZY = {
    "UpcycleLMConfig": "lm_config",
    "UpcycleLMPreTrainedModel": "lm",
    "UpcycleLMModel": "lm",
    "UpcycleLMForCausalLM": "lm",
    "UpcycleBAMConfig": "bam_config",
    "UpcycleBAMPreTrainedModel": "bam",
    "UpcycleBAMModel": "bam",
    "UpcycleBAMForCausalLM": "bam",
}
# what upcycle_lm / upcycle_bam checkpoints name in "architectures"
MODEL_CLASS_NAMES = ("UpcycleLMModel", "UpcycleLMForCausalLM", "UpcycleBAMModel", "UpcycleBAMForCausalLM")

# transformers' Auto module -> our module that must be loaded (hence registered) once it is.
_TRIGGERS = {
    "transformers.models.auto.configuration_auto": ("lm_config", "bam_config"),
    "transformers.models.auto.modeling_auto": ("lm", "bam"),
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


def get_model_class(name: str) -> type | None:
    """The upcycle model class called ``name`` (e.g. ``"UpcycleLMForCausalLM"``), or None if there is none."""
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name) if name in MODEL_CLASS_NAMES else None


def register() -> None:
    """Register every class with the Auto API now (importing transformers' modelling code). Idempotent."""
    for modules in _TRIGGERS.values():
        for module in modules:
            importlib.import_module(f"{__name__}.{module}")


def _load_quietly(modules: tuple[str, ...]) -> None:
    """Runs inside transformers' import: a failure here must not break transformers, so it only warns."""
    for module in modules:
        try:
            importlib.import_module(f"{__name__}.{module}")
        except Exception as error:  # any failure: transformers itself still has to import
            warnings.warn(
                f"upcycle could not register its model types with transformers ({type(error).__name__}: {error}); "
                f"`import upcycle.models.{module}` before loading an upcycle_lm / upcycle_bam checkpoint",
                RuntimeWarning,
                stacklevel=2,
            )


class _RunAfterLoader(importlib.abc.Loader):
    """Wraps a module's loader to run ``callback`` once the module has executed (a post-import hook)."""

    def __init__(self, loader: importlib.abc.Loader, callback: Callable[[], None]):
        self.loader, self.callback = loader, callback

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        self.callback()

    def __getattr__(self, name: str):  # anything else (get_source, is_package, ...) is the real loader's
        return getattr(self.loader, name)


class _AutoModuleHook(importlib.abc.MetaPathFinder):
    """Finds transformers' Auto modules with the finders after it, and wraps their loaders (see ``_TRIGGERS``)."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _TRIGGERS:
            return None
        later = sys.meta_path[sys.meta_path.index(self) + 1 :] if self in sys.meta_path else []
        for finder in later:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None:
                spec.loader = _RunAfterLoader(spec.loader, functools.partial(_load_quietly, _TRIGGERS[fullname]))
                return spec
        return None


def register_on_transformers_import() -> None:
    """Register with transformers' Auto API when it loads, or now for the parts already loaded. Idempotent, and
    imports nothing from transformers until something else does."""
    if not any(isinstance(finder, _AutoModuleHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AutoModuleHook())
    for trigger, module in _TRIGGERS.items():
        if trigger in sys.modules:
            _load_quietly(module)


__all__ = [*_LAZY, "MODEL_CLASS_NAMES", "get_model_class", "register", "register_on_transformers_import"]
