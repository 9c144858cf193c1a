"""Export a converted HunYuan dense model as a Hugging Face HunYuan-MoE checkpoint (Tencent Hunyuan Team,
"Hunyuan-Large", arXiv 2411.02265; Hunyuan-A13B): ``AutoModelForCausalLM.from_pretrained(directory)`` gives a
``HunYuanMoEV1ForCausalLM`` with the same logits.

Read from transformers' ``modeling_hunyuan_v1_dense.py`` and ``modeling_hunyuan_v1_moe.py``: the two share every module
but the MLP (RMSNorms, GQA with ``attention_bias`` on all four projections, RoPE, including the ``dynamic`` + ``alpha``
NTK variant, applied before an RMSNorm over each query and key head, ``query_layernorm`` / ``key_layernorm``
``[head_dim]``, no sliding window), and their configs hold the same backbone fields. The MoE model's block,
``HunYuanMoEV1Moe``, in every layer:

- ``HunYuanMoEV1Gate``: ``p = softmax(wg x)`` in fp32, the top-k probabilities always divided by their sum
  (``renormalize=False`` is refused);
- ``HunYuanMoEV1Experts``: ``down · (silu(gate x) ⊙ up x)`` without biases, each of width ``intermediate_size``;
- ``shared_mlp``: a SwiGLU MLP of the same ``intermediate_size``, added unscaled, always present. An ungated shared
  expert of the expert width is written there; without one we write zeros, which add down(silu(0) ⊙ 0) = 0 exactly
  (the price: one always-on expert's compute and parameters per layer); a gated one is refused;
- no dense layers: a partial conversion is refused.

Tensor mapping for decoder layer i (per-expert names, which transformers v5 stacks at load into
``mlp.experts.gate_up_proj [e, 2h, d]`` / ``mlp.experts.down_proj [e, d, h]`` through the Qwen2-MoE conversion
pattern):

    ours (MoE layer)                   HunYuan-MoE
    router.gate.weight     [e, d]      model.layers.{i}.mlp.gate.wg.weight                       [e, d]
    experts.w_gate[j]      [h, d]      model.layers.{i}.mlp.experts.{j}.gate_proj.weight         [h, d]
    experts.w_up[j]        [h, d]      model.layers.{i}.mlp.experts.{j}.up_proj.weight           [h, d]
    experts.w_down[j]      [d, h]      model.layers.{i}.mlp.experts.{j}.down_proj.weight         [d, h]
    shared_expert (or zeros)           model.layers.{i}.mlp.shared_mlp.{gate,up,down}_proj.weight
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
    expert_slice,
    export_note,
    read_source,
    refuse,
    routed_shape,
    write_checkpoint,
)
from .ungated_shared import ungated_shared_width, zero_shared

TARGET = "HunYuan-MoE"


@EXPORT_FORMATS.register(
    "hunyuan_v1_moe",
    "transformers' HunYuan-MoE: a converted HunYuan dense LM, every FFN an MoE, renormalised top-k, a shared MLP",
)
def export_hunyuan_v1_moe(model: nn.Module, directory: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` (an ``upcycle.convert``-ed HunYuan dense causal LM) as a HunYuan-MoE checkpoint."""
    source = read_source(model, TARGET, "hunyuan_v1_moe")
    config = hunyuan_v1_moe_config(source)  # checks everything before anything is written
    tensors = chain(
        backbone_tensors(source),
        *(moe_tensors(i, m, config.intermediate_size) for i, m in sorted(source.moe.items())),
    )
    note = export_note(source, "hunyuan_v1_moe")
    return write_checkpoint(directory, config, tensors, source, note, overwrite)


def hunyuan_v1_moe_config(source: Source):
    from transformers import HunYuanMoEV1Config

    if source.dense_layers:
        raise refuse(
            TARGET,
            f"decoder layers {source.dense_layers} are still dense FFNs, but every HunYuan-MoE layer is a sparse MoE "
            "block; convert with layers='all'",
        )
    attention_bias = bool(getattr(source.config, "attention_bias", False))
    check_backbone(source, TARGET, biased=ATTENTION if attention_bias else ())
    shape = routed_shape(source, TARGET)
    if not shape.renormalize:
        raise refuse(
            TARGET,
            "the router does not renormalise the top-k weights (renormalize=False), but HunYuan-MoE always divides "
            "them by their sum; convert with router_renormalize=True",
        )
    width = ungated_shared_width(source, TARGET, "build the MoE without shared_expert_gate, or use export_qwen2_moe")
    if width not in (0, shape.d_hidden):
        raise refuse(
            TARGET,
            f"the shared expert is {width} wide, but HunYuan-MoE's shared MLP has the experts' width, "
            f"intermediate_size = {shape.d_hidden}",
        )
    c = source.config
    return HunYuanMoEV1Config(
        **backbone_config(source),
        intermediate_size=shape.d_hidden,  # each expert's width, and the shared MLP's
        num_experts=shape.num_experts,
        moe_topk=shape.top_k,
        attention_bias=attention_bias,
        eod_token_id=getattr(c, "eod_token_id", None),
        sep_token_id=getattr(c, "sep_token_id", None),
        architectures=["HunYuanMoEV1ForCausalLM"],
    )


def moe_tensors(index: int, moe: MoE, width: int) -> Iterator[tuple[str, torch.Tensor]]:
    prefix, experts = f"model.layers.{index}.mlp.", moe.experts
    yield prefix + "gate.wg.weight", moe.router.gate.weight  # [e, d]
    for j in range(experts.num_experts):
        yield f"{prefix}experts.{j}.gate_proj.weight", expert_slice(experts.w_gate, j)  # [h, d]
        yield f"{prefix}experts.{j}.up_proj.weight", expert_slice(experts.w_up, j)  # [h, d]
        yield f"{prefix}experts.{j}.down_proj.weight", expert_slice(experts.w_down, j)  # [d, h]
    shared = moe.shared_expert
    parts = zero_shared(width, moe.d_model, experts.w_up.dtype) if shared is None else \
        {"gate": shared.gate.weight, "up": shared.up.weight, "down": shared.down.weight}  # fmt: skip
    for ours, tensor in parts.items():  # [h, d], [h, d], [d, h]
        yield f"{prefix}shared_mlp.{ours}_proj.weight", tensor
