"""Fashion-MNIST (Xiao et al. 2017): 28x28 grey images of clothing, 10 classes, 60k train + 10k test.

Where from: the original IDX files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``, looked up in the folder given
by ``root=``, else ``$UPCYCLE_FASHION_MNIST``, else ``/usr/share/datasets/fashion-mnist`` (the Debian package
``dataset-fashion-mnist``). An explicitly given folder is the only one searched, so a wrong path fails instead of
silently reading another copy.

Split rule: the official 60k train images -> train 55,000 / val 5,000 (500 per class, seeded, stratified);
test = the official 10,000 test images, never used for choices.
Augmentation (train, ``augment=True``): random shift by up to 2 px and horizontal flips (clothes stay clothes).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from .idx import read_idx
from .image import AugmentPolicy, ImageDataset, ImageSource, pixel_stats
from .paths import FETCH_COMMAND, missing
from .registry import register
from .splits import stratified_split

NAME = "fashion_mnist"
ENV = "UPCYCLE_FASHION_MNIST"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
VAL_PER_CLASS = 500
POLICY = AugmentPolicy(crop_padding=2, hflip=True)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):  # the gzipped originals, or the same files unpacked
        if (folder / name).is_file():
            return folder / name
    return None


def locate(root: str | Path | None = None) -> Path:
    """The folder holding all four IDX files, or a ``FileNotFoundError`` that says how to get them."""
    explicit = root if root is not None else os.environ.get(ENV) or None
    folder = Path(explicit).expanduser() if explicit else SYSTEM_DIR
    stems = [stem for pair in FILES.values() for stem in pair]
    absent = [stem for stem in stems if _find(folder, stem) is None]
    if absent:
        where = "the folder given by root=" if root is not None else f"${ENV}" if explicit else "the default folder"
        raise missing(
            NAME,
            f"{', '.join(s + '.gz' for s in absent)} not found in {folder} ({where}).",
            [
                f"sudo apt-get update && sudo apt-get install -y {DEBIAN_PACKAGE}   # installs them in {SYSTEM_DIR}",
                f"or: {FETCH_COMMAND} {NAME}   # runs that apt-get when run as root",
                f"or: put the four files in a folder and set {ENV}=/that/folder (or pass root=)",
            ],
        )
    return folder


@lru_cache(maxsize=2)
def _pools(folder: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The decoded official train and test sets, kept for the life of the process (about 55 MB)."""
    pools = {}
    for pool, (images_stem, labels_stem) in FILES.items():
        images = read_idx(_find(Path(folder), images_stem))  # uint8 [N, 28, 28]
        labels = read_idx(_find(Path(folder), labels_stem)).astype(np.int64)  # [N]
        if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
            raise ValueError(f"{folder}: unexpected {pool} shapes {images.shape} / {labels.shape}")
        pools[pool] = (images, labels)
    return pools


@lru_cache(maxsize=4)
def _splits(folder: str, seed: int) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], tuple[float, float]]:
    pools = _pools(folder)
    images, labels = pools["train"]
    index = stratified_split(labels, {"val": VAL_PER_CLASS}, seed)
    splits = {name: (images[idx], labels[idx]) for name, idx in index.items()}
    splits["test"] = pools["test"]
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
    folder = str(locate(root).resolve())
    splits, (train_mean, train_std) = _splits(folder, seed)
    images, labels = splits[split]
    src = ImageSource(NAME, split, images, labels, 255.0, CLASSES, POLICY, train_mean, train_std, folder, seed)
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
