"""Resumable training checkpoints, written atomically and verified on load.

    <out>/checkpoints/step-00000200/
        model.safetensors     the model's full tensors (unwrapped; gathered from the shards under FSDP)
        ema.safetensors       EMA weights, when EMA is on
        trainer.pt            optimizer, scheduler, sampler position, RNG states, step (read with weights_only=True)
        manifest.json         step + size and SHA-256 of every file above: written last, so it marks completeness

A checkpoint directory is renamed into place only when complete. On resume the newest checkpoint whose manifest
matches its files is used; a damaged one (truncated file, wrong checksum, unreadable) is skipped with a warning
and the previous good one is used instead.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_directory

MANIFEST = "manifest.json"


@dataclass
class Checkpoint:
    step: int
    path: Path
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    trainer: dict


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(tuple(states["python"]) if not isinstance(states["python"], tuple) else states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(root: Path, step: int, model_state: dict[str, torch.Tensor], trainer_state: dict,
                    ema_state: dict[str, torch.Tensor] | None, keep: int) -> Path:  # fmt: skip
    """Write ``step``'s checkpoint; ``model_state`` holds full tensors, each storage once (``unique_state``)."""
    path = root / f"step-{step:08d}"
    with atomic_directory(path, overwrite=True) as staging:
        save_file(model_state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        if ema_state is not None:
            save_file(ema_state, str(staging / "ema.safetensors"), metadata={"format": "pt"})
        torch.save({**trainer_state, "step": step, "rng": rng_states()}, staging / "trainer.pt")
        files = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(staging.iterdir())}
        (staging / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=2) + "\n")
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _read(path: Path) -> Checkpoint:
    manifest = json.loads((path / MANIFEST).read_text())
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file() or file.stat().st_size != expected["bytes"] or _sha256(file) != expected["sha256"]:
            raise ValueError(f"{file} does not match the manifest")
    ema_file = path / "ema.safetensors"
    return Checkpoint(
        step=int(manifest["step"]),
        path=path,
        model=load_file(str(path / "model.safetensors")),
        ema=load_file(str(ema_file)) if ema_file.is_file() else None,
        trainer=torch.load(path / "trainer.pt", map_location="cpu", weights_only=True),
    )


def latest_checkpoint(root: Path) -> Checkpoint | None:
    """The newest intact checkpoint under ``root``; damaged ones are reported and skipped."""
    for path in sorted(root.glob("step-*"), reverse=True):
        try:
            return _read(path)
        except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as error:
            warnings.warn(f"checkpoint {path} is damaged ({error}); falling back to the previous one", stacklevel=2)
    return None
