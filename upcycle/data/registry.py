"""The dataset registry: ``list_datasets()`` and ``load_dataset(name, split, **options)``.

Each dataset module registers one loader ``load(split, *, option=default, ...)`` with ``@register(name)``. Options
are keyword-only, so ``load_dataset`` can check them against the loader's signature and name the accepted ones
when a caller passes something unknown (a typo fails loudly instead of being ignored).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch.utils.data import Dataset

from ..registry import Registry
from .splits import check_split

DATASETS: Registry[Callable[..., Dataset]] = Registry("dataset")


class UnknownDatasetError(ValueError):
    """A name ``list_datasets()`` does not know; the message lists the known ones (bad input, like any ValueError)."""


def register(name: str) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    """Decorator for a dataset module's loader; its description is the module docstring's first sentence."""
    return DATASETS.register(name)


def list_datasets() -> list[str]:
    return DATASETS.names()


def dataset_options(name: str) -> list[str]:
    """The keyword options ``load_dataset(name, split, ...)`` accepts."""
    params = inspect.signature(_loader(name)).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _loader(name: str) -> Callable[..., Dataset]:
    if name not in DATASETS:
        raise UnknownDatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}")
    return DATASETS.get(name)


def load_dataset(name: str, split: str, **options) -> Dataset:
    """Load one split of a dataset; ``dataset.info`` describes it (see ``DatasetInfo``)."""
    loader = _loader(name)
    check_split(split)
    unknown = sorted(set(options) - set(dataset_options(name)))
    if unknown:
        raise TypeError(
            f"dataset {name!r} has no option {', '.join(unknown)}; options: {', '.join(dataset_options(name))}"
        )
    return loader(split, **options)
