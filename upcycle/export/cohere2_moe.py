"""Export a converted Cohere2 model (Command R7B / Command A, Cohere, "Command A: An Enterprise-Ready Large Language
Model", arXiv 2504.00698) as a Hugging Face Cohere2-MoE checkpoint: ``AutoModelForCausalLM.from_pretrained(
directory)`` gives a ``Cohere2MoeForCausalLM`` with the same logits.

Read from transformers' ``modeling_cohere2_moe.py`` against ``modeling_cohere2.py``: the LayerNorm (no bias), the
interleaved rotary embedding, the attention and the decoder layer are the same code, so

- parallel blocks: ``y = x + attn(ln(x)) + ffn(ln(x))`` with one ``input_layernorm``; the norms are Cohere2's
  LayerNorm as long as ``rms_norm_eps`` is unset (None), which we leave so;
- per-layer ``layer_types``: sliding-window layers apply RoPE, full-attention layers none; we write the source's
  ``layer_types`` and ``sliding_window``;
- the logits are multiplied by ``logit_scale``;
- ``Cohere2MoeTopKRouter`` with ``expert_selection_fn="softmax"`` takes the top-k of the router *logits* and a
  softmax over those k alone: the same choice and weights as the top-k of ``softmax(W_g x)`` divided by their sum,
  i.e. our renormalised top-k (raw top-k probabilities have no counterpart); ``Cohere2MoeExperts``:
  ``down · (silu(gate x) ⊙ up x)`` without biases;
- ``num_shared_experts > 0`` adds ``shared_experts(x)``, a SiLU-gated MLP of width ``num_shared_experts ·
  intermediate_size``, unweighted when ``shared_expert_combination_strategy="sum"``;
- ``mlp_layer_types[i] == "dense"`` keeps a SwiGLU MLP of width ``prefix_dense_intermediate_size`` (the same three
  projections as Cohere2's MLP). One difference: with ``prefix_dense_sliding_window_pattern == 1`` (the default),
  such a layer applies RoPE even under full attention (``force_rope``), which Cohere2 never does; the pattern is
  read nowhere else once ``layer_types`` is explicit, so we write another value.

So an upcycle top-k MoE over a Cohere2 source, renormalised, with any layers left dense and ungated shared experts
whose width is a multiple of the experts', is stored exactly; raw top-k, gated shared experts and sources of
other families (sequential blocks, RMSNorm) are refused with the reason.

Tensor mapping for decoder layer i (per-expert names, which transformers v5 stacks at load into
``mlp.experts.gate_up_proj [e, 2h, d]`` / ``mlp.experts.down_proj [e, d, h]`` through the Qwen2-MoE conversion
pattern it registers for ``cohere2_moe``); everything else keeps Cohere2's name:

    ours (MoE layer)                   Cohere2-MoE
    router.gate.weight     [e, d]      model.layers.{i}.mlp.gate.weight                          [e, d]
    experts.w_gate[j]      [h, d]      model.layers.{i}.mlp.experts.{j}.gate_proj.weight         [h, d]
    experts.w_up[j]        [h, d]      model.layers.{i}.mlp.experts.{j}.up_proj.weight           [h, d]
    experts.w_down[j]      [d, h]      model.layers.{i}.mlp.experts.{j}.down_proj.weight         [d, h]
    shared_expert.gate/up  [s, d]      model.layers.{i}.mlp.shared_experts.{gate,up}_proj.weight [s, d]
    shared_expert.down     [d, s]      model.layers.{i}.mlp.shared_experts.down_proj.weight      [d, s]
    dense Cohere2 MLP                  model.layers.{i}.mlp.{gate,up,down}_proj.weight  (mlp_layer_types "dense")
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.hf_common import rope_parameters
from ..layers import MoE
from .formats import EXPORT_FORMATS
from .hf_moe_common import (
    ATTENTION,
    Source,
    attention_windows,
    backbone_tensors,
    check_backbone,
    dense_tensors,
    dense_width,
    export_note,
    is_tied,
    read_source,
    refuse,
    routed_shape,
    routed_tensors,
    write_checkpoint,
)
from .ungated_shared import ungated_shared_width, zero_shared

TARGET = "Cohere2-MoE"
NO_FORCED_ROPE = 2  # any prefix_dense_sliding_window_pattern but 1: dense full-attention layers stay RoPE-free


@EXPORT_FORMATS.register(
    "cohere2_moe", "transformers' Cohere2-MoE: a converted Cohere2 LM, renormalised top-k, dense layers, shared experts"
)
def export_cohere2_moe(model: nn.Module, directory: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` (an ``upcycle.convert``-ed Cohere2 causal LM) as a Cohere2-MoE checkpoint."""
    source = read_source(model, TARGET, "cohere2_moe")
    config = cohere2_moe_config(source)  # checks everything before anything is written
    shared = config.num_shared_experts * config.intermediate_size
    tensors = chain(
        backbone_tensors(source),  # Cohere2's names, the tied head as its own copy
        *(moe_tensors(i, m, shared) for i, m in sorted(source.moe.items())),
        *(dense_tensors(source, i) for i in source.dense_layers),
    )
    return write_checkpoint(directory, config, tensors, source, export_note(source, "cohere2_moe"), overwrite)


def cohere2_moe_config(source: Source):
    from transformers import Cohere2MoeConfig

    attention_bias = bool(getattr(source.config, "attention_bias", False))
    check_backbone(source, TARGET, biased=ATTENTION if attention_bias else ())
    shape = routed_shape(source, TARGET)
    if not shape.renormalize:
        raise refuse(
            TARGET,
            "the router does not renormalise the top-k weights (renormalize=False), but Cohere2-MoE's softmax "
            "router takes a softmax over the top-k logits alone, which sums to 1; convert with "
            "router_renormalize=True",
        )
    window, layer_types = attention_windows(source.config)
    return Cohere2MoeConfig(
        **cohere2_backbone_config(source),
        intermediate_size=shape.d_hidden,  # each expert's width
        num_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
        expert_selection_fn="softmax",
        num_shared_experts=shared_count(source, shape.d_hidden),
        shared_expert_combination_strategy="sum",  # our shared expert adds its output unweighted
        mlp_layer_types=["dense" if i in source.dense_layers else "sparse" for i in range(len(source.layers))],
        prefix_dense_intermediate_size=dense_width(source, TARGET),
        prefix_dense_sliding_window_pattern=NO_FORCED_ROPE,
        layer_types=layer_types,
        sliding_window=window if window is not None else source.config.sliding_window,
        attention_bias=attention_bias,
        architectures=["Cohere2MoeForCausalLM"],
    )


def cohere2_backbone_config(source: Source) -> dict[str, Any]:
    """The config fields Cohere2 and Cohere2-MoE share (Cohere2 has a LayerNorm eps, no RMSNorm eps)."""
    c = source.config
    rope = rope_parameters(c)
    return {
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
        "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        "max_position_embeddings": c.max_position_embeddings, "layer_norm_eps": c.layer_norm_eps,
        "rms_norm_eps": None,  # None selects Cohere2's LayerNorm in every block and the final norm
        "rope_parameters": rope, "rope_theta": rope["rope_theta"], "hidden_act": "silu",
        "logit_scale": c.logit_scale, "attention_dropout": getattr(c, "attention_dropout", 0.0),
        "initializer_range": c.initializer_range,
        "tie_word_embeddings": is_tied(source.model),  # what the weights do, whatever the flag says
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
        "dtype": str(next(source.model.parameters()).dtype).removeprefix("torch."),
    }  # fmt: skip


def shared_count(source: Source, d_hidden: int) -> int:
    """Check our shared experts have Cohere2-MoE's structure; their width in routed experts (0: none has one)."""
    width = ungated_shared_width(source, TARGET, "build the MoE with shared_expert_gate=False")
    if not width:
        return 0
    if width % d_hidden:
        raise refuse(
            TARGET,
            f"the shared expert width {width} is not a multiple of the expert width {d_hidden}; {TARGET}'s shared "
            "MLP is num_shared_experts · intermediate_size wide",
        )
    return width // d_hidden


def moe_tensors(index: int, moe: MoE, shared_width: int) -> Iterator[tuple[str, torch.Tensor]]:
    yield from routed_tensors(index, moe)
    if not shared_width:
        return
    prefix, shared = f"model.layers.{index}.mlp.shared_experts.", moe.shared_expert
    if shared is None:  # this layer has none, others have: a zero shared MLP adds exactly 0
        weights = zero_shared(shared_width, moe.d_model, moe.experts.w_up.dtype)
    else:
        weights = {name: getattr(shared, name).weight for name in ("gate", "up", "down")}
    for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
        yield f"{prefix}{theirs}.weight", weights[ours]
