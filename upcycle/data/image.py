"""``ImageDataset``: small greyscale image sets held in memory, turned into model-ready tensors one item at a time.

Every image source (Fashion-MNIST, MNIST-5k, sklearn digits) hands over a split as integer pixels ``[N, H, W]`` and
labels ``[N]``; this module does the rest, in this order, per item:

1. scale pixels to [0, 1] (divide by the source's maximum: 255, or 16 for sklearn digits);
2. augment (train split only, and only with ``augment=True``): a random shift by up to ``crop_padding`` pixels
   (zero padding = the background of these sets, then a crop back to size) and, where the source allows it, a
   horizontal flip with probability 1/2. Augmentation draws from torch's global RNG, which ``DataLoader`` seeds per
   worker from ``torch.manual_seed``, so a seeded run is reproducible;
3. fit to ``image_size``: ``fit="resize"`` (bilinear, antialiased) or ``fit="pad"`` (centre, zero = background);
4. normalise with the train split's pixel mean/std (or given ``mean``/``std``, e.g. ImageNet's for a pretrained
   ViT) and repeat the grey channel ``channels`` times.

Items are ``{"x": float32 [C, S, S], "labels": int64 []}``, so ``torch.utils.data.default_collate`` batches them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .info import DatasetInfo


@dataclass(frozen=True)
class AugmentPolicy:
    """What train-time augmentation makes sense for a source (at its native resolution)."""

    crop_padding: int  # random shift of up to this many pixels in each direction
    hflip: bool  # False for digits: a mirrored 2, 3, 7 ... is no longer that digit


@dataclass(frozen=True)
class ImageSource:
    """One split of an image set as the source module hands it over."""

    name: str
    split: str
    images: np.ndarray  # integer pixels [N, H, W]
    labels: np.ndarray  # int [N]
    pixel_max: float  # 255 for 8-bit images, 16 for sklearn digits
    classes: tuple[str, ...]
    policy: AugmentPolicy
    train_mean: float  # pixel statistics of the train split, in [0, 1] units
    train_std: float
    source: str
    seed: int


def pixel_stats(images: np.ndarray, pixel_max: float) -> tuple[float, float]:
    """Mean and std of all pixels after scaling to [0, 1]; callers pass the train split only."""
    scaled = images.astype(np.float64) / pixel_max
    return float(scaled.mean()), float(scaled.std())


def _per_channel(value: float | Sequence[float], channels: int, what: str) -> torch.Tensor:
    values = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(f"{what} has {len(values)} values but the dataset yields {channels} channel(s)")
    return torch.tensor(values, dtype=torch.float32).view(channels, 1, 1)  # [C, 1, 1] broadcasts over [C, S, S]


class ImageDataset(Dataset):
    def __init__(
        self,
        src: ImageSource,
        *,
        image_size: int | None = None,
        channels: int = 1,
        augment: bool = False,
        fit: str = "resize",
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        max_samples: int | None = None,
    ):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if fit not in ("resize", "pad"):
            raise ValueError(f"fit must be 'resize' or 'pad', got {fit!r}")
        native = int(src.images.shape[-1])
        image_size = native if image_size is None else int(image_size)
        if fit == "pad" and image_size < native:
            raise ValueError(f"fit='pad' cannot shrink {native}px images to {image_size}px; use fit='resize'")
        index = np.arange(len(src.labels))
        if max_samples is not None and max_samples < len(index):
            # a seeded subset, so a quick run sees every class rather than the first rows of a sorted file
            index = np.sort(np.random.default_rng(src.seed).permutation(len(index))[:max_samples])
        self.images = torch.from_numpy(np.ascontiguousarray(src.images[index]))  # [N, H, W] integer pixels
        self.labels = torch.from_numpy(src.labels[index].astype(np.int64))  # [N]
        self.pixel_max = float(src.pixel_max)
        self.policy = src.policy
        self.augment = bool(augment) and src.split == "train"  # val/test stay deterministic whatever is passed
        self.fit, self.image_size, self.channels, self.native = fit, image_size, channels, native
        self.mean = _per_channel(src.train_mean if mean is None else mean, channels, "mean")  # [C, 1, 1]
        self.std = _per_channel(src.train_std if std is None else std, channels, "std")
        self.info = DatasetInfo(
            name=src.name,
            kind="image",
            split=src.split,
            size=len(self.labels),
            source=src.source,
            seed=src.seed,
            num_classes=len(src.classes),
            classes=src.classes,
            image_size=image_size,
            channels=channels,
            mean=tuple(self.mean.flatten().tolist()),
            std=tuple(self.std.flatten().tolist()),
            augment=self.augment,
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.images[i].to(torch.float32).div_(self.pixel_max).unsqueeze(0)  # [1, H, W] in [0, 1]
        if self.augment:
            x = self._augment(x)
        x = self._fit(x)  # [1, S, S]
        x = (x.expand(self.channels, -1, -1) - self.mean) / self.std  # [C, S, S], a new tensor
        return {"x": x, "labels": self.labels[i]}

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        p = self.policy.crop_padding
        if p > 0:
            h, w = x.shape[-2:]
            top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
            x = F.pad(x, (p, p, p, p))[:, top : top + h, left : left + w]  # zero padding = background
        if self.policy.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x

    def _fit(self, x: torch.Tensor) -> torch.Tensor:
        s, n = self.image_size, self.native
        if s == n:
            return x
        if self.fit == "pad":
            before = (s - n) // 2
            after = s - n - before
            return F.pad(x, (before, after, before, after))
        # antialias matters when shrinking; bilinear is the usual choice for upsampling small images
        return F.interpolate(x.unsqueeze(0), size=(s, s), mode="bilinear", antialias=True, align_corners=False)[0]
