"""Export a converted Granite model as a Hugging Face GraniteMoe or GraniteMoeShared checkpoint (PowerLM / PowerMoE,
Shen et al., "Power Scheduler", arXiv 2408.13359): ``AutoModelForCausalLM.from_pretrained(directory)`` gives a
``GraniteMoeForCausalLM`` / ``GraniteMoeSharedForCausalLM`` with the same logits.

Read from transformers' ``modeling_granitemoe.py`` and ``modeling_granitemoeshared.py`` against
``modeling_granite.py``: the RMSNorm, rotary embedding and attention are the same code, and so are Granite's four
multipliers, which the config carries under the same names:

- ``embedding_multiplier``: the token embeddings are scaled before the first layer;
- ``attention_multiplier``: the attention's softmax scale, in place of ``head_dim**-0.5``;
- ``residual_multiplier``: each sub-layer's output is scaled before it is added to the residual stream;
- ``logits_scaling``: the logits are divided by it.

Only the FFN differs: ``block_sparse_moe`` in every decoder layer (the config has no dense-layer list), whose
``GraniteMoeTopKRouter`` takes the top-k of the router *logits* ``W_g x`` and a softmax over those k alone, i.e.
``exp(l_j) / Σ_topk exp(l_i)`` = the top-k of ``softmax(W_g x)`` divided by their sum, the same choice and weights
as our renormalised top-k (raw top-k probabilities have no counterpart); ``GraniteMoeExperts``:
``down · (silu(gate x) ⊙ up x)`` without biases, gate rows first in the fused ``input_linear``. GraniteMoeShared
adds ``shared_mlp(x)`` unweighted (no gate): a SiLU-gated MLP of width ``shared_intermediate_size``, gate rows first
in its ``input_linear``.

So an upcycle top-k MoE over a Granite source with every layer converted and the router renormalised is stored
exactly as GraniteMoe, and with ungated shared experts as GraniteMoeShared (a layer without one gets a zero shared
MLP, which adds exactly 0); dense layers, raw top-k, gated shared experts and sources of other families are
refused with the reason.

Tensor mapping for decoder layer i (the layout of the published checkpoints, which transformers v4 reads as is and
v5 renames at load, ``conversion_mapping.py``, "granitemoe"); everything else keeps Granite's name:

    ours (MoE layer)                   GraniteMoe(Shared)
    router.gate.weight                 model.layers.{i}.block_sparse_moe.router.layer.weight     [e, d]
    cat(w_gate, w_up, dim=1)           model.layers.{i}.block_sparse_moe.input_linear.weight     [e, 2h, d]
    experts.w_down                     model.layers.{i}.block_sparse_moe.output_linear.weight    [e, d, h]
    cat(shared gate, up, dim=0)        model.layers.{i}.shared_mlp.input_linear.weight           [2s, d]
    shared_expert.down                 model.layers.{i}.shared_mlp.output_linear.weight          [d, s]
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain
from pathlib import Path

import torch
from torch import nn

from ..layers import MoE
from .formats import EXPORT_FORMATS
from .hf_moe_common import (
    ATTENTION,
    Source,
    backbone_config,
    backbone_tensors,
    check_backbone,
    export_note,
    read_source,
    refuse,
    routed_shape,
    write_checkpoint,
)
from .ungated_shared import ungated_shared_width, zero_shared

MULTIPLIERS = ("embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling")
NAMES = {"granitemoe": "GraniteMoe", "granitemoeshared": "GraniteMoeShared"}


@EXPORT_FORMATS.register(
    "granitemoe", "transformers' GraniteMoe: a converted Granite LM, every FFN an MoE, renormalised top-k"
)
def export_granitemoe(model: nn.Module, directory: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` (an ``upcycle.convert``-ed Granite causal LM) as a GraniteMoe checkpoint."""
    return export_granite(model, directory, "granitemoe", overwrite)


@EXPORT_FORMATS.register(
    "granitemoeshared",
    "transformers' GraniteMoeShared: a converted Granite LM, every FFN an MoE, renormalised top-k, ungated shared "
    "experts",
)
def export_granitemoeshared(model: nn.Module, directory: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` (an ``upcycle.convert``-ed Granite causal LM, shared experts allowed) as GraniteMoeShared."""
    return export_granite(model, directory, "granitemoeshared", overwrite)


def export_granite(model: nn.Module, directory: str | Path, format: str, overwrite: bool) -> Path:
    target = NAMES[format]
    source = read_source(model, target, format)
    config = granite_config(source, format)  # checks everything before anything is written
    width = getattr(config, "shared_intermediate_size", 0)
    tensors = chain(backbone_tensors(source), *(moe_tensors(i, m, width) for i, m in sorted(source.moe.items())))
    return write_checkpoint(directory, config, tensors, source, export_note(source, format), overwrite)


def granite_config(source: Source, format: str):
    import transformers

    target = NAMES[format]
    if source.dense_layers:
        raise refuse(
            target,
            f"decoder layers {source.dense_layers} are still dense FFNs, but every {target} layer is a sparse MoE "
            "block; convert with layers='all'",
        )
    attention_bias = bool(getattr(source.config, "attention_bias", False))
    check_backbone(source, target, biased=ATTENTION if attention_bias else ())
    shape = routed_shape(source, target)
    if not shape.renormalize:
        raise refuse(
            target,
            f"the router does not renormalise the top-k weights (renormalize=False), but {target}'s router takes a "
            "softmax over the top-k logits alone, which sums to 1; convert with router_renormalize=True",
        )
    hint = "build the MoE with shared_expert_gate=False, or export with 'qwen2_moe'"
    shared = {} if format == "granitemoe" else {"shared_intermediate_size": ungated_shared_width(source, target, hint)}
    if format == "granitemoe" and any(m.shared_expert is not None for m in source.moe.values()):
        layers = sorted(i for i, m in source.moe.items() if m.shared_expert is not None)
        raise refuse(target, f"layers {layers} have a shared expert, which GraniteMoe has not; use 'granitemoeshared'")
    config_class = getattr(transformers, f"{target}Config")
    return config_class(
        **backbone_config(source),
        **{name: getattr(source.config, name) for name in MULTIPLIERS},
        **shared,
        intermediate_size=shape.d_hidden,  # GraniteMoe's intermediate_size is each expert's width
        num_local_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
        attention_bias=attention_bias,
        architectures=[f"{target}ForCausalLM"],
    )


def moe_tensors(index: int, moe: MoE, shared_width: int) -> Iterator[tuple[str, torch.Tensor]]:
    prefix, experts = f"model.layers.{index}.", moe.experts
    yield prefix + "block_sparse_moe.router.layer.weight", moe.router.gate.weight  # [e, d]
    # gate rows first: GraniteMoeExperts computes act(gate) * up from input_linear(x).chunk(2, dim=-1)
    yield prefix + "block_sparse_moe.input_linear.weight", torch.cat([experts.w_gate, experts.w_up], dim=1)
    yield prefix + "block_sparse_moe.output_linear.weight", experts.w_down  # [e, d, h]
    if not shared_width:
        return
    shared = moe.shared_expert
    if shared is None:  # this layer has none, others have: a zero shared MLP adds exactly 0
        weights = zero_shared(shared_width, moe.d_model, experts.w_up.dtype)
    else:
        weights = {name: getattr(shared, name).weight for name in ("gate", "up", "down")}
    # gate rows first, as for the experts: GraniteMoeSharedMLP chunks input_linear(x) into (gate, up)
    yield prefix + "shared_mlp.input_linear.weight", torch.cat([weights["gate"], weights["up"]], dim=0)  # [2s, d]
    yield prefix + "shared_mlp.output_linear.weight", weights["down"]  # [d, s]
