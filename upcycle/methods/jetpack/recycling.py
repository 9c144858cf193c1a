"""MoE Jetpack (Zhu et al., "MoE Jetpack: From Dense Checkpoints to Adaptive Mixture of Experts for Vision Tasks",
arXiv 2406.04801): checkpoint recycling into a SpheroMoE layer.

Experts are sampled out of a dense FFN: from the model itself or from a **wider predecessor** (the paper fills
ViT-T-sized experts from ViT-S MLPs), using activation statistics measured on calibration images
(docs/methods/jetpack.md, "Checkpoint recycling"):

    importance  per expert, h hidden units drawn without replacement ∝ their activation magnitude (paper default)
    graph       METIS parts of the co-activation graph, unioned at random up to h units
    uniform     evenly spaced units, shifted per expert
    random      independent uniform subsets
    copy        sparse upcycling inside SpheroMoE: core experts are copies of the model's own FFN, universal
                experts random slices of it (the baseline of the paper's recycling ablation)

With a predecessor of width d_src > d, model channels are chosen too: ``channels=shared`` (paper text: one top-d
set by importance averaged over the MoE layers) or ``sampled`` (released code: per expert ∝ importance). Weights
outside the MoE layers (patch embedding, attention, norms, head) stay those of the model being converted.

The layer (docs/methods/jetpack.md, "SpheroMoE layer"): dual-path experts, E_core core experts of hidden width h
and E_univ universal experts of width h / ``universal_ratio``, one slot each by default
(``router.slots_per_expert``), under the SpheroMoE router (or Soft MoE for the component ablation:
``slot_router=soft``). Defaults follow the paper: E_core ≈ n/2 and E_univ ≈ n for n tokens per example. The sampled
index sets are saved with the model as buffers (a seed is not portable across devices). ``finish`` sets the readout
(class token, or the released code's mean pooling). Each switch where the paper and the released code differ is
listed in ``choices.py`` (``--preset paper`` / ``released``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from ...adapters.dense_ffn import DenseFFN
from ...config import StrictModel
from ...layers import MoE
from ...layers.dual_experts import DualPathExperts
from ...recycling import register_method
from ...recycling.routers import seeded_router
from .calibration import FFNStatistics, channel_scores, collect_ffn_statistics
from .sampling import (
    channel_selection,
    graph_partition_sampling,
    importance_sampling,
    random_sampling,
    slice_expert_weights,
    uniform_selection,
)

PAPER = "https://arxiv.org/abs/2406.04801"


class JetpackOptions(StrictModel):
    strategy: Literal["importance", "graph", "uniform", "random", "copy"] = Field(
        "importance", description="how hidden units are sampled into experts (module docstring)"
    )
    predecessor: str | None = Field(None, description="a wider dense model to sample experts from (SOURCE)")
    channels: Literal["shared", "sampled"] = Field("shared", description="model channels from a wider predecessor")
    channel_statistic: Literal["input", "input_output"] = Field(
        "input", description="channel importance: the FFN input's L2 norm (released code) or the mean of the input's "
        "and the output's"
    )  # fmt: skip
    core_experts: int | None = Field(None, ge=1, description="E_core (default: n/2 for n tokens per example; n "
                                                             "without universal experts)")  # fmt: skip
    universal_experts: int | None = Field(None, ge=0, description="E_univ (default: the tokens per example)")
    core_hidden: int | None = Field(None, ge=1, description="h (default: the model's FFN width; half of it when "
                                                            "sampling from the model itself)")  # fmt: skip
    universal_ratio: int = Field(4, ge=1, description="universal expert width = h / this")
    universal_sampling: Literal["direct", "wide_then_thin"] = Field(
        "direct", description="universal experts' units: drawn at their own width, or drawn at the core width h "
        "and thinned to evenly spaced h / universal_ratio of them (released code)"
    )  # fmt: skip
    slot_router: Literal["sphero", "soft"] = Field("sphero", description="SpheroMoE, or Soft MoE (ablation)")
    key_projection: bool = Field(False, description="learnable key projection (paper Alg. 1; released code: none)")
    key_norm: bool = Field(
        False,
        description="L2-normalise keys (released code); off: the paper text, which keeps "
        "their scale (our default: +4 points validation accuracy in the benchmark's ablation)",
    )
    temperatures: Literal["one", "two"] = Field("two", description="one shared or dispatch + combine temperatures")
    temperature_init: float = Field(0.5, gt=0, description="initial temperature (released code: 0.5)")
    combine: Literal["softmax", "entmax15"] = Field("softmax", description="combine over slots (released: entmax15)")
    noise_on: Literal["cosines", "logits"] = Field(
        "cosines", description="router noise (router.noise_std) on the cosines before the temperatures, or on the "
        "dispatch and combine logits after them (released code)"
    )  # fmt: skip
    noise_in_eval: bool = Field(False, description="router noise in evaluation too (released code); off: training only")
    noise_per_expert: bool = Field(
        False, description="divide router.noise_std by the expert count E_core + E_univ (released: std 1/E)"
    )
    soft_normalize: bool = Field(
        True, description="slot_router=soft: L2-normalised tokens and slot queries with a learnable scale (Soft MoE "
        "paper, arXiv 2308.00951); off: raw dot products"
    )  # fmt: skip
    expert_dropout: float = Field(0.0, ge=0, lt=1, description="expert regularisation probability")
    dropout_variant: Literal["paper", "released"] = Field(
        "paper", description="paper: each expert's slot outputs dropped per example; released: element-wise "
        "dropout after both projections inside every expert"
    )  # fmt: skip
    drop_path: float = Field(
        0.0, ge=0, lt=1, description="probability that an example's whole MoE output is dropped (released: 0.1)"
    )
    readout: Literal["class_token", "mean_pool"] = Field(
        "class_token", description="class_token: the checkpoint's own readout; mean_pool: patch tokens averaged into "
        "a fresh LayerNorm, the checkpoint's final norm dropped (released code; timm ViTs)"
    )  # fmt: skip
    calibration_data: str = Field("fashion_mnist", description="images whose train split calibrates (never test): "
                                  "a built-in set, an image folder or a hub dataset")  # fmt: skip
    calibration_images: int = Field(256, ge=1, description="calibration images")
    graph_parts: int = Field(32, ge=2, description="METIS parts (strategy graph; released code: 32)")
    graph_threshold: float = Field(0.0, ge=0, description="co-activation counts above this make an edge")


@dataclass
class LayerSource:
    """What one MoE layer is recycled from: the source FFN, its statistics, the shared channels, the token count."""

    dense: DenseFFN
    statistics: FFNStatistics
    shared_channels: torch.Tensor | None  # [d] when channels=shared
    tokens_per_example: int


def prepare(model, adapter, sites, config) -> list[LayerSource]:
    """Load the predecessor (if any), measure its FFNs on calibration images, and pair each site with its source."""
    from ...adapters import find_adapter  # adapters import recycling: resolved at call time
    from ...sources import load_source

    options = JetpackOptions(**config.options)
    if adapter.task != "image_classification":
        raise ValueError(f"moe_jetpack recycles vision models (it calibrates on images); {adapter.name} models are "
                         f"{adapter.task.replace('_', ' ')} models: use sparse_upcycling or neuron_split")  # fmt: skip
    source_model, source_adapter = model, adapter
    if options.predecessor is not None:
        source_model = load_source(options.predecessor)
        source_adapter = find_adapter(source_model)
    source_sites, model_sites = source_adapter.ffn_sites(source_model), adapter.ffn_sites(model)
    if len(source_sites) != len(model_sites):
        raise ValueError(
            f"the predecessor has {len(source_sites)} FFNs but the model has {len(model_sites)}; "
            "layers are paired by index, so give a predecessor of the same depth"
        )
    paired = [source_sites[site.index] for site in sites]
    images = calibration_images(source_model, options)
    statistics = collect_ffn_statistics(source_model, images, sites=[s.name for s in paired],
                                        coactivation=options.strategy == "graph", adapter=source_adapter)  # fmt: skip
    sources = [source_adapter.read_ffn(source_model, s) for s in paired]
    widths = [adapter.read_ffn(model, site).d_model for site in sites]
    # One channel set per residual stream (all of a ViT; one per ConvNeXt stage), by importance averaged over its
    # MoE layers: the layers of one stream read the same channels.
    streams: dict[int, list[torch.Tensor]] = {}
    for dense, s in zip(sources, paired, strict=True):
        streams.setdefault(dense.d_model, []).append(channel_scores(statistics[s.name], options.channel_statistic))
    layer_sources = []
    for dense, s, width in zip(sources, paired, widths, strict=True):
        shared = None
        if options.channels == "shared":
            shared = channel_selection(torch.stack(streams[dense.d_model]).mean(0), width, 1, "shared")[0]
        tokens = max(1, statistics[s.name].tokens // images.shape[0])
        layer_sources.append(LayerSource(dense, statistics[s.name], shared, tokens))
    return layer_sources


def calibration_images(model, options: JetpackOptions) -> torch.Tensor:
    """The first ``calibration_images`` training images of ``calibration_data`` (a built-in set or the user's), at
    the model's input size."""
    from ...eval.tasks import image_dataset

    data = image_dataset(model, options.calibration_data, "train")
    count = min(options.calibration_images, len(data))
    return torch.stack([data[i]["x"] for i in range(count)])


def finish(model, adapter, config, source: dict) -> tuple[dict, list[str]]:
    """After the MoE layers are in: the readout. ``mean_pool`` (released code) averages the patch tokens into a fresh
    norm, as the model's adapter knows how. Returns the model's new description and the tensors it dropped."""
    if JetpackOptions(**config.options).readout == "class_token":
        return source, []
    kwargs, dropped = adapter.mean_pool_readout(model)
    return {**source, "kwargs": {**source.get("kwargs", {}), **kwargs}}, dropped


@register_method("moe_jetpack", PAPER, "experts sampled from a (wider) dense FFN by activation importance into a "
                 "SpheroMoE dual-path layer", options=JetpackOptions, prepare=prepare, finish=finish)  # fmt: skip
def moe_jetpack(dense: DenseFFN, config, generator: torch.Generator, context: LayerSource) -> MoE:
    options = JetpackOptions(**config.options)
    n = context.tokens_per_example
    e_univ = n if options.universal_experts is None else options.universal_experts
    e_core = options.core_experts or (max(1, round(n / 2)) if e_univ else n)  # no universal path: Soft MoE's n
    source = dense if options.strategy == "copy" else context.dense
    h_source = source.d_hidden
    # Default width: the model's own FFN width, except when sampling the model's own units (whole copies would not
    # differ), then half of them.
    sampling_itself = options.strategy != "copy" and h_source == dense.d_hidden
    h = options.core_hidden or (h_source // 2 if sampling_itself else dense.d_hidden)
    h_univ = max(1, h // options.universal_ratio)
    if h > h_source:
        raise ValueError(f"core_hidden {h} is wider than the source FFN's {h_source} hidden units")

    core_units = hidden_units(options, context, source, e_core, h, generator)
    univ_units = None
    if e_univ and options.universal_sampling == "wide_then_thin" and options.strategy != "copy":
        # released convert_vit_to_dualpath: core-width draws, each thinned to the same evenly spaced positions
        positions = torch.linspace(0, h - 1, h_univ).round().long()
        univ_units = hidden_units(options, context, source, e_univ, h, generator)[:, positions]  # [e_u, h_univ]
    elif e_univ:
        univ_units = hidden_units(options, context, source, e_univ, h_univ, generator)
    channels = None
    if source.d_model != dense.d_model and options.channels == "shared":
        channels = context.shared_channels.expand(e_core + e_univ, -1)
    elif source.d_model != dense.d_model:
        scores = channel_scores(context.statistics, options.channel_statistic)
        channels = channel_selection(scores, dense.d_model, e_core + e_univ, "sampled", generator)
    experts = DualPathExperts.create(
        e_core, e_univ, dense.d_model, h, h_univ, expert_dropout=options.expert_dropout,
        dropout_variant=options.dropout_variant, drop_path=options.drop_path, activation=source.activation,
        gated=source.gated,
        bias=(source.b_up is not None, source.b_down is not None), initialize=False,
        hidden_norm_eps=None if source.hidden_norm is None else source.hidden_norm[2],
    )  # fmt: skip
    fill(experts.core, source, core_units, None if channels is None else channels[:e_core])
    if univ_units is not None:
        fill(experts.universal, source, univ_units, None if channels is None else channels[e_core:])
    layer = MoE(build_router(options, config.router, dense.d_model, e_core + e_univ, generator), experts)
    layer.register_buffer("core_hidden_units", core_units)
    if univ_units is not None:
        layer.register_buffer("universal_hidden_units", univ_units)
    if channels is not None:
        layer.register_buffer("expert_channels", channels.contiguous())
    return layer.to(dense.w_up.dtype)


def hidden_units(options: JetpackOptions, context: LayerSource, source: DenseFFN, experts: int, h: int,
                 generator: torch.Generator) -> torch.Tensor:  # fmt: skip
    """[experts, h] hidden-unit indices of ``source`` for each expert, by the chosen strategy."""
    total = source.d_hidden
    if options.strategy == "copy":  # core experts are whole copies; narrower ones random slices
        if h == total:
            return torch.arange(total).expand(experts, -1).contiguous()
        return random_sampling(total, experts, h, generator)
    if options.strategy == "importance":
        return importance_sampling(context.statistics.hidden_importance, experts, h, generator)
    if options.strategy == "graph":
        return graph_partition_sampling(context.statistics.coactivation, experts, h, generator,
                                        parts=options.graph_parts, threshold=options.graph_threshold)  # fmt: skip
    if options.strategy == "uniform":
        return uniform_selection(total, experts, h)
    return random_sampling(total, experts, h, generator)


@torch.no_grad()
def fill(experts, source: DenseFFN, hidden: torch.Tensor, channels: torch.Tensor | None) -> None:
    for name, tensor in slice_expert_weights(source, hidden, channels).items():
        target = getattr(experts, name)
        if target is not None:
            target.copy_(tensor)


def build_router(options: JetpackOptions, recipe_router, d_model: int, num_experts: int, generator: torch.Generator):
    """The slot router; ``slots_per_expert`` and ``noise_std`` come from the recipe's router section."""
    if options.slot_router == "soft":
        return seeded_router("soft", d_model, num_experts, generator, slots_per_expert=recipe_router.slots_per_expert,
                             normalize=options.soft_normalize)  # fmt: skip
    noise_std = recipe_router.noise_std / (num_experts if options.noise_per_expert else 1)
    return seeded_router(
        "sphero", d_model, num_experts, generator, slots_per_expert=recipe_router.slots_per_expert,
        key_projection=options.key_projection, key_norm=options.key_norm, temperatures=options.temperatures,
        temperature_init=options.temperature_init, noise_std=noise_std, combine=options.combine,
        noise_on=options.noise_on, noise_in_eval=options.noise_in_eval,
    )  # fmt: skip
