"""Classification heads: ``with_classifier(model, num_labels)`` gives a converted encoder, LM or timm model a fresh
head (the adapter knows where its family keeps one), and ``classes_in(data)`` sizes it from a dataset's labels."""

from __future__ import annotations

from torch import nn

from .adapters import adapter_of
from .errors import UserError


def with_classifier(model: nn.Module, num_labels: int) -> nn.Module:
    """``model`` with a freshly initialised head of ``num_labels`` classes (added, or replacing its own); the body,
    MoE layers included, is kept, and the record follows so the model saves and reloads with its new head."""
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise UserError(f"--num-labels must be an integer >= 2, got {num_labels!r}")
    return adapter_of(model).with_classifier(model, num_labels)


def classes_in(data: str, data_options: dict | None = None, seed: int = 0) -> int:
    """How many classes the training split of ``data`` (a built-in name or the user's SPEC) labels."""
    from .data.registry import is_builtin

    options = dict(data_options or {})
    if is_builtin(data):
        from .data import load_dataset

        info = load_dataset(data, "train", seed=seed, **options).info
        count = info.num_classes or len(info.domains)
    else:
        from .data.user import VAL_FRACTION, class_names, find_column, pick_split, read_splits

        train = pick_split(read_splits(data), "train", options.get("val_fraction", VAL_FRACTION), seed)
        count = len(class_names(train, find_column(train, "label", options.get("label_column"), data)))
    if count < 2:
        raise UserError(f"{data} labels {count} class(es); a classifier needs at least 2")
    return count
