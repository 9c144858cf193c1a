"""MoE Jetpack (Zhu et al., arXiv 2406.04801) point by point: the paper, the authors' released code
(github.com/Adlith/MoE-Jetpack: ``moejet/models/soft_moe.py``, ``fast_softmoe_layer.py``, ``vit_softmoe_timm.py``,
``moejet/tools/gen_ViT_MoE_weight.py`` and the ViT-T config ``moejet/configs/timm/vit_tiny_dual_moe_timm_21k_ft.py``),
ours. Fields are paths into a whole ``upcycle run`` recipe (``jetpack_mnist5k``). Where the paper is silent the
value is NOT_STATED and the paper preset leaves the recipe's value.
"""

from __future__ import annotations

from ...presets import METHOD_CHOICES, NOT_STATED, Choice

# fmt: off
CHOICES: tuple[Choice, ...] = (
    # ---- checkpoint recycling ------------------------------------------------------------------------------------
    Choice(
        "Which hidden units an expert inherits",
        "importance", "importance", "importance", field="convert.options.strategy",
        why="Drawn without replacement in proportion to each unit's activation L2 norm, as both sources do.",
    ),
    Choice(
        "Model channels kept when the source is wider (ViT-S experts into a ViT-T)",
        "shared", "sampled", "shared", field="convert.options.channels",
        why="One top-d set read by every expert matches the residual stream the experts write to; the released "
        "per-expert draw makes each expert read different source channels.",
    ),
    Choice(
        "Channel importance statistic",
        NOT_STATED, "input", "input", field="convert.options.channel_statistic",
        why="Fixed: we averaged the FFN input's and output's norms; the released code measures the FFN input "
        "(norm2's output) alone, and the paper gives no formula.",
    ),
    Choice(
        "Universal experts' hidden units",
        NOT_STATED, "wide_then_thin", "direct", field="convert.options.universal_sampling",
        why="A direct draw at h/4 keeps the importance weighting at the universal width; the released code draws "
        "core-width sets and keeps the same evenly spaced quarter of each (about every fourth unit).",
    ),
    Choice(
        "Universal expert width divisor (width h / this)",
        4, 4, 4, field="convert.options.universal_ratio",
        why="As both sources.",
    ),
    Choice(
        "Core / universal expert counts for n tokens per image",
        "about n/2 and n", "98 and 196 for n = 197 (universal = 2 x core)", "round(n/2) and n",
        why="The same rule up to one universal expert; core_experts and universal_experts set them by hand.",
    ),
    Choice(
        "Calibration images",
        NOT_STATED, 38400, 512, field="convert.options.calibration_images",
        why="38400 ImageNet training images in the released script; 512 images of the downstream train split "
        "already give stable importances on our small sets.",
    ),
    Choice(
        "Uniform strategy: evenly spaced units per expert",
        "evenly spaced", "every expert the same set", "evenly spaced, shifted per expert",
        why="Fixed in our sampler: identical experts have nothing to route between.",
    ),
    Choice(
        "Graph strategy: METIS parts of the co-activation graph",
        NOT_STATED, 32, 32, field="convert.options.graph_parts",
        why="As released.",
    ),
    Choice(
        "Graph strategy: how an expert takes parts",
        NOT_STATED, "17 parts drawn by internal co-activation, then truncated", "random order, exactly h units",
        why="Every expert gets exactly h units, and the last part contributes a random subset rather than its head.",
    ),
    Choice(
        "MoE layers",
        NOT_STATED, "last_half", "last_half", field="convert.layers",
        why="The released ViT-T config converts blocks 6-11 of 12.",
    ),
    # ---- SpheroMoE router ----------------------------------------------------------------------------------------
    Choice(
        "Learnable key projection",
        True, False, False, field="convert.options.key_projection",
        why="Algorithm 1 of the paper has one, the released layer none (its OffsetScale option is off); ours "
        "starts at the identity when on.",
    ),
    Choice(
        "L2-normalise the keys",
        False, True, False, field="convert.options.key_norm",
        why="Our ablation: keys that keep their scale scored about 4 points higher validation accuracy.",
    ),
    Choice(
        "Temperatures: one shared, or dispatch and combine apart",
        NOT_STATED, "two", "two", field="convert.options.temperatures",
        why="As released (one shared scored 84.8 against 85.0 validation accuracy); ours are stored as log τ so "
        "they stay positive.",
    ),
    Choice(
        "Initial temperature",
        NOT_STATED, 0.5, 0.5, field="convert.options.temperature_init",
        why="As released.",
    ),
    Choice(
        "Combine weights over slots",
        "softmax", "entmax15", "softmax", field="convert.options.combine",
        why="The paper's text; entmax-1.5 scored 86.6 against 85.0 validation accuracy with key norm on, not yet "
        "retried with our key-norm-off default.",
    ),
    Choice(
        "Router noise: standard deviation (divided by E_core + E_univ when per-expert)",
        NOT_STATED, 1.0, 0.0, field="convert.router.noise_std",
        why="Off by default; the released size, 1/E, is small next to the logits' range of ±1/τ.",
    ),
    Choice(
        "Router noise scaled by 1 / expert count",
        NOT_STATED, True, False, field="convert.options.noise_per_expert",
        why="The released config sets noise_mult = 1 / (core + universal experts).",
    ),
    Choice(
        "Where the noise is added",
        NOT_STATED, "logits", "cosines", field="convert.options.noise_on",
        why="On the cosines the noise keeps its size whatever the temperatures learn; released adds one draw to "
        "both dispatch and combine logits after dividing by them.",
    ),
    Choice(
        "Router noise in evaluation too",
        False, True, False, field="convert.options.noise_in_eval",
        why="A noisy evaluation is not repeatable; the released layer adds noise whenever add_noise is set.",
    ),
    Choice(
        "Slot queries: orthogonal init, LayerNorm, then L2 norm",
        "yes", "yes", "yes",
        why="As both sources (the released eps sits outside the norm; the difference is below float precision).",
    ),
    Choice(
        "Soft MoE router (component ablation, Soft MoE baseline): normalised tokens and queries, learnable scale",
        True, True, True, field="convert.options.soft_normalize",
        why="Fixed: our Soft MoE baseline used raw dot products; the Soft MoE paper (arXiv 2308.00951) and the "
        "released SoftMoELayerWrapper normalise both and learn a scale.",
    ),
    # ---- experts and regularisation ------------------------------------------------------------------------------
    Choice(
        "Expert regularisation variant",
        "paper", "released", "paper", field="convert.options.dropout_variant",
        why="Paper: whole experts dropped per example; released: element-wise dropout after both projections of "
        "each expert. Fixed: our released variant lacked the dropout after the second projection.",
    ),
    Choice(
        "Expert dropout rate",
        NOT_STATED, 0.4, 0.0, field="convert.options.expert_dropout",
        why="At 0.1 the paper variant was level with none (85.2 against 85.0 validation accuracy) and the released "
        "one 1.2 points lower, so it stays off.",
    ),
    Choice(
        "Per-example drop of the whole MoE output (drop path)",
        NOT_STATED, 0.1, 0.0, field="convert.options.drop_path",
        why="Fixed: it used the expert dropout rate; the released code gives it its own rate (moe_drop_path_rate).",
    ),
    Choice(
        "Readout",
        NOT_STATED, "mean_pool", "class_token", field="convert.options.readout",
        why="The class token keeps the checkpoint's trained final norm; released pools patch tokens into a fresh "
        "LayerNorm (timm global_pool='avg').",
    ),
    # ---- fine-tuning ---------------------------------------------------------------------------------------------
    Choice(
        "Layer-wise learning-rate decay",
        NOT_STATED, 0.6, None, field="train.layer_decay",
        why="Our four-block models leave little depth to decay over.",
    ),
    Choice(
        "Mixup alpha",
        NOT_STATED, 0.8, 0.0, field="train.mixup",
        why="Off for our 12-epoch runs on 28-pixel digits.",
    ),
    Choice(
        "CutMix alpha",
        NOT_STATED, 1.0, 0.0, field="train.cutmix",
        why="Off for our 12-epoch runs on 28-pixel digits.",
    ),
    Choice(
        "Gradient clipping (max global norm)",
        NOT_STATED, 5.0, 1.0, field="train.grad_clip",
        why="Our shared training default.",
    ),
    Choice(
        "Label smoothing",
        NOT_STATED, 0.1, 0.1, field="train.label_smoothing",
        why="As released.",
    ),
)
# fmt: on

METHOD_CHOICES.add("moe_jetpack", CHOICES, description="MoE Jetpack: paper, released code, ours")
