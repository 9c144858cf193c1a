"""Optional dependencies: each belongs to an extra of the package, and a missing one is named with its extra.

    pip install 'upcycle[gguf]'          reading .gguf checkpoints (gguf, accelerate: transformers dequantises them)
    pip install 'upcycle[tensorboard]'   TensorBoard scalars next to each training run's metrics.csv
    pip install 'upcycle[sklearn]'       the built-in ``digits`` dataset (scikit-learn's bundled 8x8 digits)
    pip install 'upcycle[metis]'         MoE Jetpack's graph-partition sampling (``strategy=graph``, METIS)
    pip install 'upcycle[all]'           all of them

The extras are declared in pyproject.toml's ``[project.optional-dependencies]``; ``EXTRAS`` below must match it
(a test checks).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import UserError

# extra -> the distributions it installs (as pip names them)
EXTRAS = {
    "gguf": ("gguf", "accelerate"),
    "tensorboard": ("tensorboard",),
    "sklearn": ("scikit-learn",),
    "metis": ("pymetis",),
    "cmoe": ("scipy",),
}


class MissingExtra(UserError, ImportError):
    """An optional dependency is not installed. A ``UserError`` (the CLI prints it as a change to make) and an
    ``ImportError`` (code that treats the dependency as optional keeps catching it)."""


def install_hint(extra: str) -> str:
    if extra not in EXTRAS:
        raise KeyError(f"no extra {extra!r}; extras: {sorted(EXTRAS)}")
    return f"pip install 'upcycle[{extra}]'"


def available(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing, or a module without a spec is in sys.modules
        return False


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``import module``, or a :class:`MissingExtra` that names the extra to install for ``purpose``.

    Only a missing ``module`` itself is translated: an installed package that fails on import of something else
    raises its own error, which says more."""
    hint = install_hint(extra)
    try:
        return importlib.import_module(module)
    except ImportError as error:
        root = module.split(".")[0]
        if error.name is not None and error.name != module and error.name.split(".")[0] != root:
            raise
        raise MissingExtra(f"{purpose} needs {module!r}, which is not installed: {hint}") from None
