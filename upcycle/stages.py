"""Multi-stage pipelines (D2DMoE, BAM / BTX) keep each stage in a folder of the run: its finished model
(``upcycle.load``-able, in ``model/``) and ``stage.json``, the recipe fields it was built from (its own and its
predecessors'). A rerun reuses a finished stage of the same recipe, resumes an interrupted one from its training
checkpoints, and refuses a folder built from another recipe unless told to rebuild it. Bookkeeping fields (how
often a run checkpoints or logs) are not part of what a stage was built from.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from torch import nn

from .atomic import atomic_write_text
from .config import BOOKKEEPING_FIELDS


def stage_model(directory: Path) -> nn.Module | None:
    """The finished model of a stage folder, or None if the stage has not finished."""
    from .export import load

    return load(directory / "model") if (directory / "model" / "config.json").is_file() else None


def cached_stage(directory: Path, fingerprint: dict, build: Callable[[], nn.Module], redo: bool) -> nn.Module:
    """The stage's model from ``directory`` if it was built from ``fingerprint``, else ``build()`` it there."""
    marker = directory / "stage.json"
    recorded = json.loads(marker.read_text()) if marker.is_file() else None
    if same_recipe(recorded, fingerprint):
        finished = stage_model(directory)
        if finished is not None:
            return finished  # else: interrupted; the build resumes from its checkpoints
    elif directory.exists() and any(directory.iterdir()):
        if not redo:
            changed = (
                "no stage.json"
                if recorded is None
                else ", ".join(
                    sorted(k for k in {*recorded, *fingerprint} if not _same(recorded.get(k), fingerprint.get(k)))
                )
            )
            raise ValueError(
                f"{directory} holds this stage for another recipe (changed: {changed}); use a new --out, delete "
                "the folder, or rerun with redo=True (--redo) to rebuild it and the stages after it"
            )
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")  # before: resumes match
    return build()


def same_recipe(recorded: dict | None, fingerprint: dict) -> bool:
    """Whether something recorded under ``recorded`` was built from ``fingerprint`` (bookkeeping fields aside; both
    as JSON has them, so tuples and lists compare equal)."""
    return recorded is not None and _same(recorded, fingerprint)


def _same(recorded, wanted) -> bool:
    return _outcome(recorded) == _outcome(json.loads(json.dumps(wanted)))


def _outcome(fingerprint):
    """``fingerprint`` without its bookkeeping fields, at any depth: what decides the stage's model."""
    if isinstance(fingerprint, dict):
        return {k: _outcome(v) for k, v in fingerprint.items() if k not in BOOKKEEPING_FIELDS}
    if isinstance(fingerprint, list):
        return [_outcome(v) for v in fingerprint]
    return fingerprint


def save_stage(model: nn.Module, directory: Path) -> None:
    """The stage's finished model, written where :func:`stage_model` finds it."""
    from .export import save

    save(model, directory / "model", overwrite=True)
