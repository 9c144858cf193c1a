"""The export format registry: name -> writer ``fn(model, directory, overwrite=False, **options) -> Path``.

Each writer registers itself in its module; its description is that module's first sentence."""

from __future__ import annotations

from collections.abc import Callable

from ..registry import Registry

EXPORT_FORMATS: Registry[Callable] = Registry("export format")
