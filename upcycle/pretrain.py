"""``upcycle pretrain``: dense checkpoints we train ourselves, since no real ViT / ConvNeXt weights exist offline.

Presets (Fashion-MNIST is our "ImageNet-21k": 28×28 grey images, patch 4 -> 49 tokens + class token):
    vit_xxs     ViT, d 64, 4 blocks, 2 heads, FFN 256 (the "T" of the MoE Jetpack benchmark; vit_xs is its "S")
    vit_xs      ViT, d 128, 4 blocks, 4 heads, FFN 512 (sized for CPU budgets: ~3× cheaper than vit_t)
    vit_t       ViT, d 192, 6 blocks, 3 heads, FFN 768 (a ViT-T-like width)
    vit_s       ViT, d 384, 6 blocks, 6 heads, FFN 1536 (the wider "S" predecessor MoE Jetpack recycles from)
    convnext_t  ConvNeXt-Atto layout (dims 40-320, depths 2-2-6-2), 1 input channel at 32 px (the
                recorded input size: 4 stages need ≥ 32 px)
    lm_tiny / lm_tiny_parallel   upcycle's own byte-level LM, d 256, 4 layers, sequential / parallel blocks
Any ``timm:ARCH`` works too. ``cached_pretrained`` trains a preset once per (preset, data, recipe) and reuses it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from filelock import FileLock
from torch import nn

from .config import load_train_config
from .sources import cache_root, load_timm

VIT = {"img_size": 28, "patch_size": 4, "in_chans": 1, "depth": 6, "mlp_ratio": 4.0}
PRESETS: dict[str, dict] = {
    "vit_xxs": {"timm": "vit_tiny_patch16_224", "kwargs": {**VIT, "depth": 4, "embed_dim": 64, "num_heads": 2}},
    "vit_xs": {"timm": "vit_tiny_patch16_224", "kwargs": {**VIT, "depth": 4, "embed_dim": 128, "num_heads": 4}},
    "vit_t": {"timm": "vit_tiny_patch16_224", "kwargs": {**VIT, "embed_dim": 192, "num_heads": 3}},
    "vit_s": {"timm": "vit_small_patch16_224", "kwargs": {**VIT, "embed_dim": 384, "num_heads": 6}},
    "convnext_t": {"timm": "convnext_atto", "kwargs": {"in_chans": 1,
                                                       "pretrained_cfg_overlay": {"input_size": [1, 32, 32]}}},
    "lm_tiny": {"lm": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "parallel_attention": False}},
    "lm_tiny_parallel": {"lm": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                                "num_attention_heads": 4, "num_key_value_heads": 2, "parallel_attention": True}},
}  # fmt: skip


def build_dense(arch: str, num_classes: int | None = None, seed: int = 0, **overrides) -> nn.Module:
    """A freshly initialised dense model: a preset name or ``timm:ARCH``."""
    import torch

    if arch.startswith("timm:"):
        return load_timm(arch[len("timm:") :], None, False, {"num_classes": num_classes, **overrides})
    if arch not in PRESETS:
        raise ValueError(f"unknown architecture {arch!r}; presets: {sorted(PRESETS)}, or timm:ARCH")
    preset = PRESETS[arch]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if "timm" in preset:
            return load_timm(preset["timm"], None, False, {**preset["kwargs"], "num_classes": num_classes, **overrides})
        from .models import UpcycleLMConfig, UpcycleLMForCausalLM

        return UpcycleLMForCausalLM(UpcycleLMConfig(**{**preset["lm"], **overrides}))


def pretrain(arch: str, out: str | Path, config=None, resume: bool = False, progress: bool = True,
             model: dict | None = None, **overrides) -> dict:  # fmt: skip
    """Build ``arch`` for the dataset's classes and train it with the shared loop; the model lands in out/model.

    ``model``: architecture overrides (e.g. ``{"depth": 4}``); ``overrides``: training options."""
    from .data import load_dataset
    from .train import train

    cfg = load_train_config(config, **overrides)
    info = load_dataset(cfg.data, "train").info
    dense = build_dense(arch, num_classes=info.num_classes if info.kind == "image" else None, seed=cfg.seed,
                        **(model or {}))  # fmt: skip
    return train(dense, cfg, out, resume=resume, progress=progress)


def cached_pretrained(arch: str, config=None, progress: bool = True, model: dict | None = None, **overrides) -> Path:
    """The folder of a dense ``arch`` pre-trained with this recipe, trained now if no cached copy exists."""
    cfg = load_train_config(config, **overrides)
    # only what differs from the defaults: a training option added later does not orphan existing caches
    description = {"arch": arch, "model": model or {}, "train": cfg.model_dump(mode="json", exclude_defaults=True)}
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:12]
    out = cache_root() / "pretrained" / f"{arch.replace(':', '-')}-{cfg.data}-{key}"
    locks = cache_root() / "locks"  # beside the models, so pretrained/ lists models only
    locks.mkdir(parents=True, exist_ok=True)
    # two benchmarks started together need the same model: the second waits for the first, then finds it
    with FileLock(locks / f"pretrained-{out.name}.lock"):
        if not (out / "model" / "config.json").is_file():
            pretrain(arch, out, cfg, resume=True, progress=progress, model=model)  # resume: an interrupted run goes on
    return out / "model"


def finetuned_minilm(finetune: dict, out: Path, num_labels: int = 3, progress: bool = True) -> nn.Module:
    """all-MiniLM-L6-v2 with a fresh head, fine-tuned densely with ``finetune`` (seed 0); cached in ``out``."""
    from .assets import minilm_classifier
    from .stages import stage_model
    from .train import train

    finished = stage_model(out)
    if finished is not None:
        return finished.eval()
    model = minilm_classifier(num_labels)
    train(model, {**finetune, "seed": 0}, out, resume=(out / "checkpoints").is_dir(), progress=progress)
    return model.eval()
