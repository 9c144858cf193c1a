"""Batch-level Mixup and CutMix, and a cross-entropy that takes hard or soft targets.

- Mixup (Zhang et al. 2018): ``x = lam * x + (1 - lam) * x[perm]``, same for one-hot labels.
- CutMix (Yun et al. 2019): a box covering about ``1 - lam`` of the image is pasted from ``x[perm]``; ``lam`` is then
  corrected to the exact fraction of pixels kept, and the labels mixed with it.
``lam ~ Beta(alpha, alpha)`` per batch; ``perm`` is a random permutation of the batch. With both alphas positive each
batch uses one of the two, with probability 1/2 each; with probability ``1 - prob`` a batch is left unmixed (its
labels still come back one-hot, so the loss sees one format). Everything random draws from ``generator`` only.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int [B] -> float [B, C]; soft labels [B, C] pass through as float."""
    if labels.dim() == 2:
        return labels.float()
    return F.one_hot(labels.long(), num_classes).float()


def mixup(x: torch.Tensor, y: torch.Tensor, lam: float, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, ...], y soft [B, C] -> mixed copies."""
    return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]


def cutmix_box(height: int, width: int, lam: float, generator: torch.Generator | None = None) -> tuple[int, ...]:
    """A box ``(top, bottom, left, right)`` of about ``(1 - lam) * H * W`` pixels around a uniform centre, clipped."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy = int(torch.randint(0, height, (1,), generator=generator))
    cx = int(torch.randint(0, width, (1,), generator=generator))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return top, bottom, left, right


def cutmix(
    x: torch.Tensor, y: torch.Tensor, box: tuple[int, int, int, int], perm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """x [B, C, H, W], y soft [B, N]: paste ``box`` from ``x[perm]``; returns x, y and the kept fraction ``lam``."""
    top, bottom, left, right = box
    height, width = x.shape[-2:]
    x = x.clone()
    x[..., top:bottom, left:right] = x[perm][..., top:bottom, left:right]
    lam = 1.0 - (bottom - top) * (right - left) / (height * width)
    return x, lam * y + (1 - lam) * y[perm], lam


def _beta(alpha: float, generator: torch.Generator | None) -> float:
    # torch's Beta sampler takes no generator; seed numpy's from it so the draw follows `generator`
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def mix_batch(
    batch: dict[str, torch.Tensor],
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """``{"x": [B, C, H, W], "labels": int [B] or soft [B, N]}`` -> a new dict with mixed ``x`` and soft ``labels``
    [B, num_classes] and ``"lam"`` (float [], the weight of the unpermuted batch; 1 when unmixed). Other keys are kept
    and the input batch is not modified."""
    x, y = batch["x"], one_hot(batch["labels"], num_classes)
    out = dict(batch)
    out["labels"], out["lam"] = y, torch.tensor(1.0)
    modes = [m for m, a in (("mixup", mixup_alpha), ("cutmix", cutmix_alpha)) if a > 0]
    if not modes or x.shape[0] < 2 or float(torch.rand((), generator=generator)) >= prob:
        return out
    mode = modes[int(torch.randint(0, len(modes), (1,), generator=generator))]
    perm = torch.randperm(x.shape[0], generator=generator)
    if mode == "mixup":
        lam = _beta(mixup_alpha, generator)
        out["x"], out["labels"] = mixup(x, y, lam, perm)
    else:
        lam = _beta(cutmix_alpha, generator)
        box = cutmix_box(x.shape[-2], x.shape[-1], lam, generator)
        out["x"], out["labels"], lam = cutmix(x, y, box, perm)
    out["lam"] = torch.tensor(lam)
    return out


def soft_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0, ignore_index: int = -100
) -> torch.Tensor:
    """Mean cross-entropy of ``logits [..., C]`` against int targets ``[...]`` or soft targets ``[..., C]``.

    Label smoothing mixes the target with the uniform distribution: ``(1 - eps) * target + eps / C``, which is what
    ``F.cross_entropy(label_smoothing=eps)`` does for int targets. Int targets equal to ``ignore_index`` are skipped.
    """
    num_classes = logits.shape[-1]
    logp = F.log_softmax(logits.float(), dim=-1).reshape(-1, num_classes)  # [M, C]
    if targets.dtype.is_floating_point:
        if targets.shape != logits.shape:
            raise ValueError(f"soft targets {tuple(targets.shape)} must match logits {tuple(logits.shape)}")
        soft = targets.float().reshape(-1, num_classes)
    else:
        flat = targets.reshape(-1)
        keep = flat != ignore_index
        logp, flat = logp[keep], flat[keep]
        soft = F.one_hot(flat.long(), num_classes).float()
    if label_smoothing > 0:
        soft = (1 - label_smoothing) * soft + label_smoothing / num_classes
    return -(soft * logp).sum(-1).mean()
