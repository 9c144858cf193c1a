"""Per-module distillation of the attention-projection MLPs (D2DMoE, arXiv 2310.04361, §3.4): each MLP that
:func:`replace_attention_projections` (``upcycle.adapters``) installed learns to reproduce the projection it
replaced, teacher-forced: the original dense model (the teacher) runs on real training images, forward hooks
capture the input and output of each of its projections, and the MLP is trained on that (input -> output) pair.
The student's own upstream layers play no part, so every MLP has an independent loss and all of them train
together in one AdamW optimizer.

Loss per MLP: MSE / mean(target²) + ``sparsity`` · squared Hoyer(hidden ReLU activations) / h. Both terms are
normalised, the error by the target's energy and the Hoyer measure (1..h) by the width, so one ``sparsity``
weight means the same at every layer, width and activation scale; the small Hoyer term prepares the MLPs for the
activation-sparsity stage (§3.1) that follows. The fused teacher ``qkv`` output ``[b, n, 3a]`` splits into the
Q, K and V targets as timm's Attention splits it. Reported: the plain MSE per MLP on a fixed batch of validation
images before and after, and the share of exactly-zero hidden activations after.
Dimension letters: b batch, n tokens, d model width, a attention width, h MLP hidden.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ...adapters import find_adapter
from ...layers.losses import hoyer_sparsity


def distill_attention_projections(model: nn.Module, teacher: nn.Module, data: str, steps: int = 500,
                                  batch_size: int = 32, lr: float = 1e-3, sparsity: float = 0.01, *, seed: int = 0,
                                  progress: bool = True) -> dict[str, dict[str, float]]:  # fmt: skip
    """Train ``model``'s projection MLPs to reproduce ``teacher``'s projections on images of dataset ``data``
    (a name for :func:`upcycle.data.load_dataset`). ``teacher``: the dense model before the replacement.

    Returns ``{mlp name: {"before": MSE, "after": MSE, "zeros": share of zero hidden activations}}``, measured
    on the first ``batch_size`` validation images. Only the MLPs' parameters change.
    """
    if steps < 0 or batch_size < 1 or lr <= 0 or sparsity < 0:
        raise ValueError(f"need steps >= 0, batch_size >= 1, lr > 0, sparsity >= 0; got {steps}, {batch_size}, "
                         f"{lr}, {sparsity}")  # fmt: skip
    pairs = find_adapter(model).attention_projection_pairs(model, teacher)
    train, val = _dataset(model, data, "train"), _dataset(model, data, "val")
    device = next(model.parameters()).device
    fixed = torch.stack([val[i]["x"] for i in range(min(batch_size, len(val)))]).to(device)  # [b, c, H, W]
    generator = torch.Generator().manual_seed(seed)
    teacher_was_training = teacher.training
    teacher.eval()
    try:
        before = _errors(pairs, teacher, fixed)
        optimizer = torch.optim.AdamW([p for _, mlp, _, _ in pairs for p in mlp.parameters()], lr=lr)
        bar = tqdm(range(steps), desc="distill attention projections", unit="step", disable=not progress)
        for _ in bar:
            chosen = torch.randperm(len(train), generator=generator)[:batch_size]
            images = torch.stack([train[int(i)]["x"] for i in chosen]).to(device)
            losses = [
                F.mse_loss(out, target) / target.square().mean().clamp_min(1e-12)
                + sparsity * hoyer_sparsity(hidden) / hidden.shape[-1]
                for out, hidden, target in _student_and_targets(pairs, teacher, images)
            ]
            loss = torch.stack(losses).sum()  # independent losses: the sum trains each MLP on its own
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item() / len(losses):.4f}")
        after = _errors(pairs, teacher, fixed)
    finally:
        teacher.train(teacher_was_training)
    return {name: {"before": before[name][0], "after": after[name][0], "zeros": after[name][1]}
            for name, _, _, _ in pairs}  # fmt: skip


def _dataset(model: nn.Module, data: str, split: str):
    from ...eval.tasks import image_dataset

    return image_dataset(model, data, split)  # at the model's input size: a built-in set or the user's images


@torch.no_grad()
def _teacher_io(teacher: nn.Module, names: set[str], images: torch.Tensor) -> dict[str, tuple]:
    """Input and output of each named teacher module on ``images``."""
    captured = {}

    def keep(name, module, args, output):
        captured[name] = (args[0], output)

    handles = [teacher.get_submodule(name).register_forward_hook(partial(keep, name)) for name in names]
    try:
        teacher(images)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _student_and_targets(pairs, teacher: nn.Module, images: torch.Tensor):
    """(MLP output, hidden ReLU activations, teacher target) per pair, the MLP fed the teacher's input."""
    io = _teacher_io(teacher, {teacher_name for _, _, teacher_name, _ in pairs}, images)
    for _, mlp, teacher_name, third in pairs:
        x, y = io[teacher_name]  # [b, n, d], [b, n, 3a] (qkv) or [b, n, d] (proj)
        target = y if third is None else y.chunk(3, dim=-1)[third]
        hidden = mlp.act(mlp.fc1(x))  # [b, n, h]; timm Mlp's forward, its identity norm and zero dropouts aside
        yield mlp.fc2(mlp.norm(hidden)), hidden, target


@torch.no_grad()
def _errors(pairs, teacher: nn.Module, images: torch.Tensor) -> dict[str, tuple[float, float]]:
    """(MSE, share of zero hidden activations) per MLP on ``images``."""
    results = _student_and_targets(pairs, teacher, images)
    return {name: (float(F.mse_loss(out, target)), float((hidden == 0).float().mean()))
            for (name, _, _, _), (out, hidden, target) in zip(pairs, results, strict=True)}  # fmt: skip
