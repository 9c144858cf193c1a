"""AdamW with parameter groups, and the warm-up + decay learning-rate schedule.

Groups: no weight decay on 1-D tensors (norms, biases, temperatures, shared biases) nor on embeddings-free scalars;
routers get ``lr × router_lr_scale``; with ``layer_decay`` (BEiT / ViT fine-tuning, arXiv 2106.08254) block i of L
gets ``lr × decay^(L - i)``, embeddings ``decay^(L + 1)``, the head and final norm the full LR. In hierarchical models
the blocks are counted across stages (``stages.s.blocks.j``, Swin's ``layers.s.blocks.j``), and a stage's
downsampling (patch merging) sits at the depth of the block before it, as in Swin's own fine-tuning (SimMIM,
arXiv 2111.09886).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn
from torch.distributed.tensor import DTensor

# "blocks.3.", "layers.3.", "h.3.", "layer.3." (BERT); "stages.1.blocks.2." and "layers.1.blocks.2." (hierarchical
# models: the stage's blocks are counted across stages), and "stages.1.downsample." / "layers.1.downsample."
_BLOCK = re.compile(r"(?:^|\.)(?:blocks|layers|h|layer)\.(\d+)\.")
_STAGE = re.compile(r"(?:^|\.)(?:stages|layers)\.(\d+)\.blocks\.(\d+)\.")
_DOWNSAMPLE = re.compile(r"(?:^|\.)(?:stages|layers)\.(\d+)\.downsample\.")
_EMBEDDING_HINTS = ("patch_embed", "pos_embed", "cls_token", "reg_token", "embed_tokens", "embeddings", "wte", "wpe",
                    "stem")  # fmt: skip
_NO_DECAY_HINTS = ("norm", "bias", "temperature", "scale", "cls_token", "pos_embed", "reg_token")


def is_router_parameter(name: str) -> bool:
    return ".router." in f".{name}" or name.startswith("router.")


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Depth of every parameter (0 = embeddings, 1..L blocks, L+1 = head and final norm) and L."""
    stage_sizes: dict[int, int] = {}
    for name, _ in model.named_parameters():
        match = _STAGE.search(name)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            stage_sizes[stage] = max(stage_sizes.get(stage, 0), block + 1)
    stage_offset = {s: sum(stage_sizes[t] for t in stage_sizes if t < s) for s in stage_sizes}
    depths: dict[str, int] = {}
    for name, _ in model.named_parameters():
        stage = _STAGE.search(name)
        downsample = _DOWNSAMPLE.search(name) if stage_sizes else None
        block = _BLOCK.search(name)
        if stage:
            depths[name] = 1 + stage_offset[int(stage.group(1))] + int(stage.group(2))
        elif downsample:  # between the previous stage's last block and this stage's first
            depths[name] = sum(size for s, size in stage_sizes.items() if s < int(downsample.group(1)))
        elif block:
            depths[name] = 1 + int(block.group(1))
        elif any(hint in name for hint in _EMBEDDING_HINTS):
            depths[name] = 0
        else:
            depths[name] = -1  # head / final norm: filled in below
    count = max([d for d in depths.values()] + [0])
    return {name: (count + 1 if d < 0 else d) for name, d in depths.items()}, count


def parameter_groups(model: nn.Module, config) -> list[dict]:
    """AdamW groups keyed by (decay, router, depth); ``config`` is a TrainConfig."""
    depths, count = layer_ids(model) if config.layer_decay else ({}, 0)
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or any(hint in name.lower() for hint in _NO_DECAY_HINTS)
        router = is_router_parameter(name)
        scale = config.router_lr_scale if router else 1.0
        depth = depths.get(name, 0)
        if config.layer_decay:
            scale *= config.layer_decay ** (count + 1 - depth)
        key = (no_decay, router, depth)
        decay = 0.0 if no_decay else config.weight_decay
        group = groups.setdefault(key, {"params": [], "weight_decay": decay, "lr_scale": scale, "names": []})
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, config) -> torch.optim.AdamW:
    groups = parameter_groups(model, config)
    if not groups:
        raise ValueError("no parameter requires gradients: the freeze setting left nothing to train")
    for group in groups:
        group["lr"] = config.lr * group["lr_scale"]
    # the fused kernel updates each tensor in one pass with no temporaries (SmolLM2 upcycled to 372 M parameters:
    # 6.1-6.6 s per step against 7.2 s for the per-tensor loop); FSDP's sharded parameters take the default path
    fused = not any(isinstance(param, DTensor) for group in groups for param in group["params"])
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay,
                             fused=fused or None)  # fmt: skip


def lr_multiplier(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of each group's peak LR at ``step`` (0-based): linear warm-up, then cosine / linear / constant."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, config) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(config.warmup * total_steps) if config.warmup < 1 else int(config.warmup)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, warmup, config.schedule, config.min_lr_ratio)
    )
