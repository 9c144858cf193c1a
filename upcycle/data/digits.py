"""sklearn digits (UCI optical recognition of handwritten digits): 1,797 images of 8x8 pixels valued 0-16, 10 classes.

Where from: ``sklearn.datasets.load_digits()``, which ships inside scikit-learn (no download).
Split rule: stratified and seeded, 60 / 20 / 20 % of each class (rounded per class) -> 1,079 / 359 / 359.
Augmentation (train, ``augment=True``): random shift by up to 1 px (an eighth of the image); no flips (digits).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .._optional import install_hint
from .image import AugmentPolicy, ImageDataset, ImageSource, pixel_stats
from .paths import missing
from .registry import register
from .splits import stratified_split

NAME = "digits"
FRACTIONS = {"val": 0.2, "test": 0.2}  # the remaining 60 % trains
PIXEL_MAX = 16.0
POLICY = AugmentPolicy(crop_padding=1, hflip=False)


@lru_cache(maxsize=1)
def _read() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise missing(NAME, "scikit-learn is not installed.", [install_hint("sklearn")]) from err
    bunch = load_digits()
    return bunch.images.astype(np.uint8), bunch.target.astype(np.int64)  # [1797, 8, 8] in 0..16, [1797]


@lru_cache(maxsize=4)
def _splits(seed: int) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], tuple[float, float]]:
    images, labels = _read()
    index = stratified_split(labels, FRACTIONS, seed)
    splits = {name: (images[idx], labels[idx]) for name, idx in index.items()}
    return splits, pixel_stats(splits["train"][0], PIXEL_MAX)


@register(NAME)
def load(
    split: str,
    *,
    seed: int = 0,
    image_size: int | None = None,
    channels: int = 1,
    augment: bool = False,
    fit: str = "resize",
    mean: float | tuple[float, ...] | None = None,
    std: float | tuple[float, ...] | None = None,
    max_samples: int | None = None,
) -> ImageDataset:
    splits, (train_mean, train_std) = _splits(seed)
    images, labels = splits[split]
    classes = tuple(str(d) for d in range(10))
    source = "sklearn.datasets.load_digits"
    src = ImageSource(NAME, split, images, labels, PIXEL_MAX, classes, POLICY, train_mean, train_std, source, seed)
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
