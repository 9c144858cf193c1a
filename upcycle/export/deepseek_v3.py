"""Export a converted dense DeepSeek-V3 model with sigmoid routers as a Hugging Face DeepSeek-V3 checkpoint
(arXiv 2412.19437): ``AutoModelForCausalLM.from_pretrained(directory)`` gives a ``DeepseekV3ForCausalLM`` with the same
logits.

DeepSeek-V3's attention is Multi-head Latent Attention: keys and values come from a compressed latent that an RMSNorm
normalises (``kv_a_layernorm``), which no setting turns into Llama's attention. So the source must itself be a
DeepSeek-V3 model with every layer dense (``first_k_dense_replace >= num_hidden_layers``: each ``mlp`` a SwiGLU
``DeepseekV3MLP``, which the ``hf_llama`` adapter converts). Its attention, norms, embeddings and head are copied
under their own names; the converted layers become the sparse blocks of ``sigmoid_moe`` (our ``sigmoid`` router,
its bias as ``e_score_correction_bias``), and must form a suffix of the layers (``first_k_dense_replace``). A
Llama-family source goes to ``glm4_moe``, which has this routing on Llama's attention.
"""

from __future__ import annotations

import copy
from itertools import chain
from pathlib import Path

from torch import nn

from ..layers.activations import from_hf
from .formats import EXPORT_FORMATS
from .hf_moe_common import (
    Source,
    backbone_tensors,
    dense_tensors,
    dense_width,
    export_note,
    is_tied,
    read_source,
    refuse,
    write_checkpoint,
)
from .sigmoid_moe import sigmoid_shape, sigmoid_tensors

TARGET = "DeepSeek-V3"


@EXPORT_FORMATS.register(
    "deepseek_v3", "transformers' DeepSeek-V3: a converted dense DeepSeek-V3 LM with sigmoid routers, dense prefix"
)
def export_deepseek_v3(model: nn.Module, directory: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` (an ``upcycle.convert``-ed dense DeepseekV3ForCausalLM) as a DeepSeek-V3 MoE checkpoint."""
    source = read_source(model, TARGET, "deepseek_v3")
    config = deepseek_v3_config(source)  # checks everything before anything is written
    width = config.moe_intermediate_size * config.n_shared_experts
    tensors = chain(
        backbone_tensors(source),
        *(sigmoid_tensors(i, m, width) for i, m in sorted(source.moe.items())),
        *(dense_tensors(source, i) for i in source.dense_layers),
    )
    return write_checkpoint(directory, config, tensors, source, export_note(source, "deepseek_v3"), overwrite)


def deepseek_v3_config(source: Source):
    """The source's own config with the sparse-block fields set from our MoE layers."""
    c = source.config
    if c.first_k_dense_replace < c.num_hidden_layers:
        raise refuse(
            TARGET,
            f"the source DeepSeek-V3 already has MoE layers (first_k_dense_replace={c.first_k_dense_replace} < "
            f"{c.num_hidden_layers} layers); convert a dense one (first_k_dense_replace >= num_hidden_layers)",
        )
    if from_hf(c.hidden_act) != "silu":
        raise refuse(TARGET, f"the source activation is {c.hidden_act!r}; only SiLU-gated sources can be exported")
    shape = sigmoid_shape(source, TARGET)
    config = copy.deepcopy(c)
    fields = {
        "intermediate_size": dense_width(source, TARGET), "moe_intermediate_size": shape.d_hidden,
        "n_routed_experts": shape.num_experts, "num_experts_per_tok": shape.top_k,
        "norm_topk_prob": shape.renormalize, "routed_scaling_factor": shape.scaling, "n_group": shape.num_groups,
        "topk_group": shape.topk_groups, "n_shared_experts": shape.shared_width // shape.d_hidden,
        "first_k_dense_replace": shape.first_dense, "tie_word_embeddings": is_tied(source.model),
        "architectures": ["DeepseekV3ForCausalLM"],
    }  # fmt: skip
    for name, value in fields.items():
        setattr(config, name, value)
    return config
