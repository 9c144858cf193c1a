"""Export a converted ERNIE-4.5 dense model as a Hugging Face ERNIE-4.5-MoE checkpoint (Baidu, "ERNIE 4.5 Technical
Report", 2025, https://ernie.baidu.com/blog/publication/ERNIE_Technical_Report.pdf):
``AutoModelForCausalLM.from_pretrained(directory)`` gives an ``Ernie4_5_MoeForCausalLM`` with the same logits.

Read from transformers' ``modeling_ernie4_5.py`` and ``modeling_ernie4_5_moe.py``: the two share every module but the
MLP (RMSNorms, GQA with a free ``head_dim``, RoPE on interleaved pairs computed in fp32, ``use_bias`` on every
projection, the tied or untied head). The MoE model's sparse block:

- ``Ernie4_5_MoeTopKRouter``: ``p = softmax(W_g x)`` in fp32; the top-k by ``p + e_score_correction_bias`` (we write
  zeros, so by ``p``), their ``p`` divided by ``max(Σ p, moe_norm_min)``: always renormalised (``renormalize=False``
  is refused), and the clamp never acts (k of e softmax probabilities sum to at least k/e > ``moe_norm_min``);
- ``Ernie4_5_MoeExperts``: ``down · (silu(gate x) ⊙ up x)`` without biases, so ``use_bias=True`` sources are refused
  (their MLPs, and so our experts, have biases; the MoE model would also add an ``lm_head`` bias);
- ``moe_num_shared_experts`` shared MLPs of width ``moe_intermediate_size`` each, one SwiGLU MLP added unscaled in
  every MoE layer: an ungated shared expert of a multiple of the expert width is written there (zeros, which add
  down(silu(0) ⊙ 0) = 0 exactly, in a layer without one), a gated one is refused;
- layer i is sparse iff ``(i + 1) % moe_layer_interval == 0`` and ``moe_layer_start_index <= i <=
  moe_layer_end_index``, the others keep a dense MLP of ``intermediate_size``: our MoE layers must form such a
  progression (all, a contiguous range such as ``last_half``, every other layer from an odd index, ...).

Tensor mapping for decoder layer i (per-expert names, the layout of the published ERNIE-4.5 MoE checkpoints, which
transformers v5 stacks at load into ``mlp.experts.gate_up_proj [e, 2h, d]`` / ``mlp.experts.down_proj [e, d, h]``
through the Qwen2-MoE conversion pattern):

    ours (MoE layer)                   ERNIE-4.5-MoE
    router.gate.weight     [e, d]      model.layers.{i}.mlp.gate.weight                          [e, d] (fp32 at load)
    (zeros)                            model.layers.{i}.mlp.moe_statics.e_score_correction_bias  [1, e]
    experts.w_gate[j]      [h, d]      model.layers.{i}.mlp.experts.{j}.gate_proj.weight         [h, d]
    experts.w_up[j]        [h, d]      model.layers.{i}.mlp.experts.{j}.up_proj.weight           [h, d]
    experts.w_down[j]      [d, h]      model.layers.{i}.mlp.experts.{j}.down_proj.weight         [d, h]
    shared_expert.{gate,up,down}       model.layers.{i}.mlp.shared_experts.{gate,up,down}_proj.weight  (if any)
    dense ERNIE MLP                    model.layers.{i}.mlp.{gate,up,down}_proj.weight  (layers left dense)
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
    write_checkpoint,
)
from .ungated_shared import ungated_shared_width, zero_shared

TARGET = "ERNIE-4.5-MoE"


@EXPORT_FORMATS.register(
    "ernie4_5_moe",
    "transformers' ERNIE-4.5-MoE: a converted ERNIE-4.5 LM, renormalised top-k, MoE layers in a progression",
)
def export_ernie4_5_moe(model: nn.Module, directory: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` (an ``upcycle.convert``-ed ERNIE-4.5 dense causal LM) as an ERNIE-4.5-MoE checkpoint."""
    source = read_source(model, TARGET, "ernie4_5_moe")
    config = ernie4_5_moe_config(source)  # checks everything before anything is written
    width = config.moe_intermediate_size * config.moe_num_shared_experts
    tensors = chain(
        backbone_tensors(source),
        *(moe_tensors(i, m, width) for i, m in sorted(source.moe.items())),
        *(dense_tensors(source, i) for i in source.dense_layers),
    )
    note = export_note(source, "ernie4_5_moe")
    return write_checkpoint(directory, config, tensors, source, note, overwrite)


def ernie4_5_moe_config(source: Source):
    from transformers import Ernie4_5_MoeConfig

    if getattr(source.config, "use_bias", False):
        raise refuse(
            TARGET,
            "the source has use_bias=True: its MLPs, and so our experts, have biases, but ERNIE-4.5-MoE's experts "
            "have none",
        )
    check_backbone(source, TARGET, biased=())
    shape = routed_shape(source, TARGET)
    if not shape.renormalize:
        raise refuse(
            TARGET,
            "the router does not renormalise the top-k weights (renormalize=False), but ERNIE-4.5-MoE always divides "
            "them by their sum; convert with router_renormalize=True",
        )
    start, end, interval = moe_progression(source)
    backbone = backbone_config(source)
    backbone.pop("attention_dropout")  # ERNIE's attention has no dropout (hard-coded 0), dense and MoE alike
    return Ernie4_5_MoeConfig(
        **backbone,
        intermediate_size=dense_width(source, TARGET),
        moe_intermediate_size=shape.d_hidden,
        moe_num_experts=shape.num_experts,
        moe_k=shape.top_k,
        moe_num_shared_experts=shared_count(source, shape.d_hidden),
        moe_layer_start_index=start,
        moe_layer_end_index=end,
        moe_layer_interval=interval,
        use_bias=False,
        architectures=["Ernie4_5_MoeForCausalLM"],
    )


def moe_progression(source: Source) -> tuple[int, int, int]:
    """(start, end, interval) whose layers ``i`` with ``(i + 1) % interval == 0`` in ``[start, end]`` are exactly
    our MoE layers: ERNIE-4.5-MoE's only rule for which layers are sparse."""
    layers = sorted(source.moe)
    start, end = layers[0], layers[-1]
    for interval in range(1, end + 2):
        if [i for i in range(start, end + 1) if (i + 1) % interval == 0] == layers:
            return start, end, interval
    raise refuse(
        TARGET,
        f"the MoE layers {layers} are not every interval-th layer of a range (ERNIE-4.5-MoE makes layer i sparse iff "
        "(i + 1) % moe_layer_interval == 0 within [moe_layer_start_index, moe_layer_end_index]); convert a "
        "contiguous range of layers, e.g. layers='all' or 'last_half'",
    )


def shared_count(source: Source, d_hidden: int) -> int:
    """How many expert widths our shared experts span (ERNIE holds ``moe_num_shared_experts`` of them), 0 if none."""
    width = ungated_shared_width(source, TARGET, "build the MoE without shared_expert_gate, or use export_qwen2_moe")
    if width % d_hidden:
        raise refuse(
            TARGET,
            f"the shared expert width {width} is not a multiple of the expert width {d_hidden}; ERNIE-4.5-MoE's is "
            "moe_num_shared_experts × moe_intermediate_size",
        )
    return width // d_hidden


def moe_tensors(index: int, moe: MoE, shared_width: int) -> Iterator[tuple[str, torch.Tensor]]:
    prefix = f"model.layers.{index}.mlp."
    yield from routed_tensors(index, moe)
    # zero correction: the top-k is chosen by the probabilities alone, as ours is
    yield prefix + "moe_statics.e_score_correction_bias", torch.zeros(1, moe.experts.num_experts)  # [1, e], fp32
    if not shared_width:
        return
    shared = moe.shared_expert
    parts = zero_shared(shared_width, moe.d_model, moe.experts.w_up.dtype) if shared is None else \
        {"gate": shared.gate.weight, "up": shared.up.weight, "down": shared.down.weight}  # fmt: skip
    for ours, tensor in parts.items():
        yield f"{prefix}shared_experts.{ours}_proj.weight", tensor
