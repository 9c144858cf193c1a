"""upcycle's own model classes, usable through transformers' Auto API.

    from upcycle.models import UpcycleLMConfig, UpcycleLMForCausalLM
    model = UpcycleLMForCausalLM(UpcycleLMConfig(hidden_size=64, intermediate_size=192, num_attention_heads=4))
    model.save_pretrained("lm/")
    model = transformers.AutoModelForCausalLM.from_pretrained("lm/")

Importing this package imports nothing from transformers: a first ``import transformers.modeling_utils`` costs
seconds, and most uses of upcycle (timm models, the CLI) never need it. The classes load on first attribute access
(PEP 562), and each module registers its classes with transformers' Auto API when it loads (``lm_config``:
``AutoConfig``; ``lm``: ``AutoModel``, ``AutoModelForCausalLM``), through transformers' documented
``AutoConfig.register`` / ``AutoModel*.register``. ``register()`` (``upcycle.register_with_transformers()``) loads
them all, so ``AutoConfig`` / ``AutoModelForCausalLM.from_pretrained(dir)`` know ``model_type="upcycle_lm"`` and
``"upcycle_bam"``; ``import upcycle`` does it for the parts of transformers already imported (``register_loaded``).
Nothing hooks the import system.
"""

from __future__ import annotations

import importlib
import sys
import warnings

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

# transformers' Auto module -> our modules that register with it when they load.
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


def register_loaded() -> None:
    """Register with the Auto modules transformers has already imported, importing nothing new from it (what
    ``import upcycle`` runs: a process that imported transformers first needs no call of its own)."""
    for trigger, modules in _TRIGGERS.items():
        if trigger not in sys.modules:
            continue
        for module in modules:
            try:
                importlib.import_module(f"{__name__}.{module}")
            except Exception as error:  # an incompatible transformers must not break `import upcycle`
                warnings.warn(
                    f"upcycle could not register its model types with transformers ({type(error).__name__}: "
                    f"{error}); upcycle_lm / upcycle_bam checkpoints will not load through the Auto classes",
                    RuntimeWarning,
                    stacklevel=2,
                )


__all__ = [*_LAZY, "MODEL_CLASS_NAMES", "get_model_class", "register", "register_loaded"]
