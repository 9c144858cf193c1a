"""Export a sigmoid-routed Llama-family model as a Hugging Face GLM4-MoE checkpoint (GLM-4.5, arXiv 2508.06471):
``AutoModelForCausalLM.from_pretrained(directory)`` gives a ``Glm4MoeForCausalLM`` with the same logits.

GLM4-MoE is DeepSeek-V3's sparse block (``sigmoid_moe``) on Llama's attention, read from transformers'
``modeling_glm4_moe.py``: q/k/v/o projections with biases on q/k/v only (``attention_bias``), an optional RMSNorm per
query and key head before RoPE (``use_qk_norm``, Qwen3's q_norm / k_norm), rotate-half RoPE on the first
``partial_rotary_factor`` of each head (we write 1.0: Llama rotates all of it; GLM's own default is 0.5), no sliding
window. So a converted Llama, Qwen2 or Qwen3 (or a Mistral without a window) whose MoE layers use our ``sigmoid``
router and form a suffix of the layers is stored exactly; softmax top-k routers are refused (GLM4-MoE has no
softmax router: convert with ``router.type: sigmoid``). Backbone tensors keep their names; a Qwen2 source's q/k/v
biases are carried over, zeros written where a source with ``attention_bias`` lacks one.
"""

from __future__ import annotations

from itertools import chain
from pathlib import Path

from torch import nn

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
    write_checkpoint,
)
from .sigmoid_moe import sigmoid_shape, sigmoid_tensors

TARGET = "GLM4-MoE"


@EXPORT_FORMATS.register(
    "glm4_moe", "transformers' GLM4-MoE: a converted Llama-family LM with sigmoid routers (DeepSeek-V3 routing)"
)
def export_glm4_moe(model: nn.Module, directory: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` (an ``upcycle.convert``-ed Llama / Mistral / Qwen2 / Qwen3 LM) as a GLM4-MoE checkpoint."""
    source = read_source(model, TARGET, "glm4_moe")
    config = glm4_moe_config(source)  # checks everything before anything is written
    width = config.moe_intermediate_size * config.n_shared_experts
    tensors = chain(
        backbone_tensors(source, zero_qkv_bias=config.attention_bias),
        *(sigmoid_tensors(i, m, width) for i, m in sorted(source.moe.items())),
        *(dense_tensors(source, i) for i in source.dense_layers),
    )
    return write_checkpoint(directory, config, tensors, source, export_note(source, "glm4_moe"), overwrite)


def glm4_moe_config(source: Source):
    from transformers import Glm4MoeConfig

    attention = source.layers[0].self_attn
    qk_norm = hasattr(attention, "q_norm")
    check_backbone(source, TARGET, biased=("q_proj", "k_proj", "v_proj"), qk_norm=qk_norm)
    window, _ = attention_windows(source.config)
    if window is not None:
        raise refuse(TARGET, f"the source attends within a sliding window of {window}; GLM4-MoE attends to all")
    shape = sigmoid_shape(source, TARGET)
    base = backbone_config(source)
    rope = {**base.pop("rope_parameters"), "partial_rotary_factor": 1.0}  # Llama rotates every head dimension
    return Glm4MoeConfig(
        **base,
        rope_parameters=rope,
        intermediate_size=dense_width(source, TARGET),
        moe_intermediate_size=shape.d_hidden,
        n_routed_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
        norm_topk_prob=shape.renormalize,
        routed_scaling_factor=shape.scaling,
        n_group=shape.num_groups,
        topk_group=shape.topk_groups,
        n_shared_experts=shape.shared_width // shape.d_hidden,
        first_k_dense_replace=shape.first_dense,
        attention_bias=any(getattr(attention, p).bias is not None for p in ("q_proj", "k_proj", "v_proj")),
        use_qk_norm=qk_norm,
        architectures=["Glm4MoeForCausalLM"],
    )
