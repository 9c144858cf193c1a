"""Export a converted Llama-family model as a Hugging Face Qwen2-MoE checkpoint (Qwen1.5-MoE / Qwen2-57B-A14B;
Qwen2 Technical Report, arXiv 2407.10671): ``AutoModelForCausalLM.from_pretrained(directory)`` gives a
``Qwen2MoeForCausalLM`` with the same logits.

A Qwen2-MoE sparse block computes ``Σ_topk p_j · expert_j(x) + sigmoid(w_s · x) · shared(x)`` with
``p = softmax(W_g x)`` in fp32, the top-k renormalised only if ``norm_topk_prob``; experts and the shared expert
are SwiGLU MLPs without biases. Layers listed in ``mlp_only_layers`` keep a dense SwiGLU MLP of width
``intermediate_size``. So, unlike Mixtral, it expresses partial conversion, unrenormalised top-k and a sigmoid-gated
shared expert. Every block *has* a shared expert: where ours has none we write one that adds exactly zero, of width 1
if no layer has a real one: its three projections are zero (``down(silu(0) ⊙ 0) = 0``), and its gate
``shared_expert_gate.weight [1, d]`` is all ones, not zero. transformers multiplies that zero by
``sigmoid(Σ_j x_j)``, which is finite, so the sum is exact. llama.cpp's qwen2moe graph computes the sigmoid as
``silu(g) / g``: a zero gate makes ``g = 0`` for every token, ``0 / 0 = NaN``, and ``NaN · 0`` poisons every
logit; with the ones gate ``g = Σ_j x_j`` of the normalised hidden state, zero only where that sum is exactly zero
(a hidden state of exact zeros, e.g. a zero embedding row attending only to itself). llama.cpp's loader requires
the shared-expert tensors (and ``output.weight``), so leaving them out is no option.

Tensor mapping for decoder layer i (per-expert names, the layout of the published Qwen2-MoE checkpoints, which
transformers v5 stacks at load into ``mlp.experts.gate_up_proj [e, 2h, d]`` / ``mlp.experts.down_proj [e, d, h]``
(``conversion_mapping.py``, "qwen2_moe"), and which transformers v4 and vLLM read as is):

    ours (MoE layer)                   Qwen2-MoE
    router.gate.weight     [e, d]      model.layers.{i}.mlp.gate.weight                          [e, d]
    experts.w_gate[j]      [h, d]      model.layers.{i}.mlp.experts.{j}.gate_proj.weight         [h, d]
    experts.w_up[j]        [h, d]      model.layers.{i}.mlp.experts.{j}.up_proj.weight           [h, d]
    experts.w_down[j]      [d, h]      model.layers.{i}.mlp.experts.{j}.down_proj.weight         [d, h]
    shared_expert.gate/up  [s, d]      model.layers.{i}.mlp.shared_expert.{gate,up}_proj.weight  [s, d]
    shared_expert.down     [d, s]      model.layers.{i}.mlp.shared_expert.down_proj.weight       [d, s]
    shared_expert_gate     [1, d]      model.layers.{i}.mlp.shared_expert_gate.weight            [1, d]
    dense LlamaMLP                     model.layers.{i}.mlp.{gate,up,down}_proj.weight  (i in mlp_only_layers)

Attention: Qwen2-family q/k/v projections carry biases. We write ``qkv_bias=True`` with the source's biases, or
zeros where it has none, so the checkpoint also loads in transformers v4 (whose Qwen2-MoE always has q/k/v biases).
``o_proj`` has no bias in Qwen2-MoE, so a source with one (Llama ``attention_bias=True``) is refused. Sliding
windows: v5's config forces ``sliding_window = 0`` unless ``use_sliding_window``, and masks follow ``layer_types``;
we write the source's ``layer_types`` explicitly (all "full_attention" for Llama).
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
    Source,
    attention_windows,
    backbone_config,
    backbone_tensors,
    check_backbone,
    dense_tensors,
    dense_width,
    export_note,
    read_source,
    refuse,
    routed_shape,
    routed_tensors,
    single_value,
    write_checkpoint,
)

TARGET = "Qwen2-MoE"
ZERO_SHARED_WIDTH = 1  # the smallest shared expert, for checkpoints where none of our layers has one


@EXPORT_FORMATS.register(
    "qwen2_moe", "transformers' Qwen2-MoE: a converted Llama-family LM, raw top-k probabilities, dense layers kept"
)
def export_qwen2_moe(model: nn.Module, directory: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` (an ``upcycle.convert``-ed Llama / Mistral / Qwen2 causal LM) as a Qwen2-MoE checkpoint."""
    source = read_source(model, TARGET, "qwen2_moe")
    config = qwen2_moe_config(source)  # checks everything before anything is written
    width = config.shared_expert_intermediate_size
    tensors = chain(
        backbone_tensors(source, zero_qkv_bias=True),
        *(moe_tensors(i, m, width) for i, m in sorted(source.moe.items())),
        *(dense_tensors(source, i) for i in source.dense_layers),
    )
    return write_checkpoint(directory, config, tensors, source, export_note(source, "qwen2_moe"), overwrite)


def qwen2_moe_config(source: Source):
    from transformers import Qwen2MoeConfig

    check_backbone(source, TARGET, biased=("q_proj", "k_proj", "v_proj"))
    shape = routed_shape(source, TARGET)
    window, layer_types = attention_windows(source.config)
    return Qwen2MoeConfig(
        **backbone_config(source),
        intermediate_size=dense_width(source, TARGET),
        moe_intermediate_size=shape.d_hidden,
        shared_expert_intermediate_size=shared_width(source),
        num_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
        norm_topk_prob=shape.renormalize,
        mlp_only_layers=source.dense_layers,
        decoder_sparse_step=1,  # with mlp_only_layers, the only rule for which layers are sparse
        qkv_bias=True,
        use_sliding_window=window is not None,
        sliding_window=window,
        max_window_layers=source.config.num_hidden_layers,  # unused: layer_types is explicit
        layer_types=layer_types,
        architectures=["Qwen2MoeForCausalLM"],
    )


def shared_width(source: Source) -> int:
    """Check our shared experts have Qwen2-MoE's structure; their common width (or the zero expert's)."""
    widths = {}
    for i, moe in sorted(source.moe.items()):
        shared, gate = moe.shared_expert, moe.shared_expert_gate
        if shared is None:
            continue
        if shared.gate is None or shared.activation != "silu" or shared.up.bias is not None:
            gated = "gated" if shared.gate is not None else "plain"
            kind = f"{gated} {shared.activation}, bias={shared.up.bias is not None}"
            raise refuse(
                TARGET, f"layer {i}: the shared expert ({kind}) is not a bias-free SiLU-gated MLP like Qwen2-MoE's"
            )
        if gate is None or gate.bias is not None:
            raise refuse(
                TARGET,
                f"layer {i}: the shared expert is not scaled by a bias-free sigmoid gate; Qwen2-MoE always "
                "multiplies it by sigmoid(shared_expert_gate·x) (build the MoE with shared_expert_gate=True)",
            )
        widths[i] = shared.up.out_features
    return single_value(TARGET, "shared expert width", widths) if widths else ZERO_SHARED_WIDTH


def moe_tensors(index: int, moe: MoE, width: int) -> Iterator[tuple[str, torch.Tensor]]:
    yield from routed_tensors(index, moe)
    yield from shared_tensors(f"model.layers.{index}.mlp.", moe, width)


def shared_tensors(prefix: str, moe: MoE, width: int) -> Iterator[tuple[str, torch.Tensor]]:
    shared, dtype, d = moe.shared_expert, moe.experts.w_up.dtype, moe.d_model
    if shared is None:  # contributes sigmoid(Σx) · down(silu(0) ⊙ 0) = 0 exactly; a ones gate keeps llama.cpp finite
        weights = {"gate_proj": (width, d), "up_proj": (width, d), "down_proj": (d, width)}
        for name, shape in weights.items():
            yield f"{prefix}shared_expert.{name}.weight", torch.zeros(shape, dtype=dtype)
        yield prefix + "shared_expert_gate.weight", torch.ones(1, d, dtype=dtype)
        return
    for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
        yield f"{prefix}shared_expert.{theirs}.weight", getattr(shared, ours).weight
    yield prefix + "shared_expert_gate.weight", moe.shared_expert_gate.weight
