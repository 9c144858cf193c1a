"""Export a converted OLMo 2 model as a Hugging Face FlexOlmo checkpoint (Shi et al., "FlexOlmo: Open Language
Models for Flexible Data Use", arXiv 2507.07024; OLMo 2: "2 OLMo 2 Furious", arXiv 2501.00656):
``AutoModelForCausalLM.from_pretrained(directory)`` gives a ``FlexOlmoForCausalLM`` with the same logits.

FlexOlmo is OLMo 2 with every MLP replaced by a sparse block, read from transformers' ``modeling_flex_olmo.py``
against ``modeling_olmo2.py``: the RMSNorm, rotary embedding, attention and decoder layer are the same code, so

- attention: q/k/v/o projections (all four biased iff ``attention_bias``), one RMSNorm over the *whole* query and
  the whole key projection (``q_norm [n_heads·head_dim]``, ``k_norm [n_kv·head_dim]``, not per head as Qwen3's)
  before RoPE, no sliding window;
- the block: ``h = x + post_attention_layernorm(attn(x))``, ``y = h + post_feedforward_layernorm(mlp(h))``: norms
  after each sub-layer, none before;
- ``FlexOlmoTopKRouter``: ``p = softmax(W_g x)`` in fp32, the top-k probabilities divided by their sum iff
  ``norm_topk_prob``; ``FlexOlmoExperts``: ``down · (silu(gate x) ⊙ up x)`` without biases; no shared expert;
- every decoder layer is sparse: the config has no dense-layer list.

So an upcycle top-k MoE over an OLMo 2 source with every layer converted, renormalised or not, is stored exactly;
partial conversions, shared experts and sources of other families (whose blocks put the norms elsewhere) are
refused with the reason.

Tensor mapping for decoder layer i (per-expert names, which transformers v5 stacks at load into
``mlp.experts.gate_up_proj [e, 2h, d]`` / ``mlp.experts.down_proj [e, d, h]`` through the Qwen2-MoE conversion
pattern it registers for ``flex_olmo``); everything else keeps OLMo 2's name:

    ours (MoE layer)                   FlexOlmo
    router.gate.weight     [e, d]      model.layers.{i}.mlp.gate.weight                          [e, d]
    experts.w_gate[j]      [h, d]      model.layers.{i}.mlp.experts.{j}.gate_proj.weight         [h, d]
    experts.w_up[j]        [h, d]      model.layers.{i}.mlp.experts.{j}.up_proj.weight           [h, d]
    experts.w_down[j]      [d, h]      model.layers.{i}.mlp.experts.{j}.down_proj.weight         [d, h]
"""

from __future__ import annotations

from itertools import chain
from pathlib import Path

from torch import nn

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
    routed_tensors,
    write_checkpoint,
)

TARGET = "FlexOlmo"


@EXPORT_FORMATS.register(
    "flex_olmo", "transformers' FlexOlmo: a converted OLMo 2 LM, every FFN an MoE, raw or renormalised top-k"
)
def export_flex_olmo(model: nn.Module, directory: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` (an ``upcycle.convert``-ed OLMo 2 causal LM) as a FlexOlmo checkpoint."""
    source = read_source(model, TARGET, "flex_olmo")
    config = flex_olmo_config(source)  # checks everything before anything is written
    tensors = chain(backbone_tensors(source), *(routed_tensors(i, m) for i, m in sorted(source.moe.items())))
    return write_checkpoint(directory, config, tensors, source, export_note(source, "flex_olmo"), overwrite)


def flex_olmo_config(source: Source):
    from transformers import FlexOlmoConfig

    if source.dense_layers:
        raise refuse(
            TARGET,
            f"decoder layers {source.dense_layers} are still dense FFNs, but every FlexOlmo layer is a sparse MoE "
            "block; convert with layers='all'",
        )
    shared = sorted(i for i, m in source.moe.items() if m.shared_expert is not None)
    if shared:
        raise refuse(TARGET, f"layers {shared} have a shared expert, which FlexOlmo has not")
    attention_bias = bool(getattr(source.config, "attention_bias", False))
    # the adapter admits OLMo 2 sources only, whose q/k norms span the whole projection as FlexOlmo's do
    check_backbone(source, TARGET, biased=ATTENTION if attention_bias else (), qk_norm=True)
    shape = routed_shape(source, TARGET)
    return FlexOlmoConfig(
        **backbone_config(source),
        intermediate_size=shape.d_hidden,  # FlexOlmo's intermediate_size is each expert's width
        num_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
        norm_topk_prob=shape.renormalize,
        attention_bias=attention_bias,
        architectures=["FlexOlmoForCausalLM"],
    )
