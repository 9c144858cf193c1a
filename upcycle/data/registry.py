"""The dataset registry: ``list_datasets()`` and ``load_dataset(name, split, **options)``.

Each dataset module registers one loader ``load(split, *, option=default, ...)`` with ``@register(name)``. Options
are keyword-only, so ``load_dataset`` can check them against the loader's signature and name the accepted ones
when a caller passes something unknown (a typo fails loudly instead of being ignored).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch.utils.data import Dataset

from ..errors import UserError
from ..registry import Registry
from .splits import check_split

DATASETS: Registry[Callable[..., Dataset]] = Registry("dataset")


class UnknownDatasetError(UserError):
    """A name that is neither a built-in dataset nor a file, folder or hub id; the message lists the built-in ones."""


def register(name: str) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    """Decorator for a dataset module's loader; its description is the module docstring's first sentence."""
    return DATASETS.register(name)


def list_datasets() -> list[str]:
    return DATASETS.names()


def is_builtin(name: str) -> bool:
    """A built-in dataset's name; anything else is a SPEC of the user's data (``upcycle.data.user``)."""
    return name in DATASETS


def dataset_options(name: str) -> list[str]:
    """The keyword options ``load_dataset(name, split, ...)`` accepts."""
    if name in DATASETS:
        loader = DATASETS.get(name)
    else:
        from .spec import load_spec as loader
    params = inspect.signature(loader).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _loader(name: str) -> Callable[..., Dataset]:
    if name in DATASETS:
        return DATASETS.get(name)
    from .spec import load_spec
    from .user import is_spec

    if not is_spec(name):
        raise UnknownDatasetError(f"unknown dataset {name!r}: not a built-in dataset ({', '.join(list_datasets())}), "
                                  "an existing file or folder, or a hub id ORG/NAME[:CONFIG]")  # fmt: skip

    return lambda split, **options: load_spec(name, split, **options)  # the options are load_spec's


def load_dataset(name: str, split: str, **options) -> Dataset:
    """Load one split of a built-in dataset or of a SPEC (a file, a folder, a hub dataset id; see
    ``upcycle.data.user``); ``dataset.info`` describes it (see ``DatasetInfo``)."""
    loader = _loader(name)
    check_split(split)
    unknown = sorted(set(options) - set(dataset_options(name)))
    if unknown:
        raise TypeError(
            f"dataset {name!r} has no option {', '.join(unknown)}; options: {', '.join(dataset_options(name))}"
        )
    return loader(split, **options)
