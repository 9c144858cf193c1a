"""What the DeepSeek-V3 and GLM4-MoE writers share: their sparse block, read from transformers'
``modeling_deepseek_v3.py`` / ``modeling_glm4_moe.py`` (the same code), and our sigmoid router's place in it.

The block computes ``Σ_topk w_j · expert_j(x) + shared(x)``: the router (``DeepseekV3TopkRouter``) takes
``s = sigmoid(W x)`` in fp32, chooses the top-k of ``s + e_score_correction_bias`` among the ``topk_group`` best of
``n_group`` groups (a group scored by its two best biased scores), and weighs the chosen experts by their unbiased
``s``, divided by their sum (+1e-20) iff ``norm_topk_prob``, times ``routed_scaling_factor``: exactly our ``sigmoid``
router (DeepSeek-V3, arXiv 2412.19437), its bias buffer written as ``e_score_correction_bias``. Experts are SwiGLU
MLPs without biases; the shared MLP (``shared_experts``) is added unweighted and is
``n_shared_experts · moe_intermediate_size`` wide, so ours is padded with zero units to a multiple of the routed
experts' width (exact: a zero unit adds nothing); a layer without one gets a zero stand-in
(``ungated_shared.zero_shared``), one routed width wide when no layer has one.
Layers ``i < first_k_dense_replace`` keep a dense MLP of width ``intermediate_size``: our MoE layers must be a suffix.

Tensor mapping for decoder layer i (per-expert names, the layout of the published checkpoints, which transformers
v5 stacks at load into ``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj``):

    ours (MoE layer)                   DeepSeek-V3 / GLM4-MoE
    router.gate.weight     [e, d]      model.layers.{i}.mlp.gate.weight                          [e, d]
    router.expert_bias     [e]         model.layers.{i}.mlp.gate.e_score_correction_bias         [e]
    experts.w_gate[j]      [h, d]      model.layers.{i}.mlp.experts.{j}.gate_proj.weight         [h, d]
    experts.w_up[j]        [h, d]      model.layers.{i}.mlp.experts.{j}.up_proj.weight           [h, d]
    experts.w_down[j]      [d, h]      model.layers.{i}.mlp.experts.{j}.down_proj.weight         [d, h]
    shared_expert.gate/up  [s, d]      model.layers.{i}.mlp.shared_experts.{gate,up}_proj.weight [s, d]
    shared_expert.down     [d, s]      model.layers.{i}.mlp.shared_experts.down_proj.weight      [d, s]
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..layers import MoE
from ..layers.routers import SigmoidRouter
from .hf_moe_common import Source, expert_slice, experts_problem, refuse, single_value
from .ungated_shared import ungated_shared_width, zero_shared


@dataclass(frozen=True)
class SigmoidShape:
    """The sparse-block settings the target config holds once for the whole model."""

    num_experts: int
    top_k: int
    d_hidden: int
    renormalize: bool
    scaling: float
    num_groups: int
    topk_groups: int
    shared_width: int  # n_shared_experts · d_hidden: a real shared expert's width, or the zero stand-in's
    first_dense: int  # first_k_dense_replace: the dense layers before the first MoE layer


def sigmoid_shape(source: Source, target: str) -> SigmoidShape:
    """Check every MoE layer is sigmoid-routed SwiGLU experts that ``target`` stores exactly; their common shape."""
    for index, moe in sorted(source.moe.items()):
        if not isinstance(moe.router, SigmoidRouter):
            raise refuse(
                target,
                f"layer {index}: its router is {type(moe.router).__name__}; {target} routes with sigmoid scores "
                "and a per-expert selection bias (convert with `router.type: sigmoid`, --router sigmoid)",
            )
        problem = experts_problem(moe.experts, target)
        if problem:
            raise refuse(target, f"layer {index}: {problem}")
    per_layer = {
        field: {i: getattr(m.router, field) for i, m in source.moe.items()}
        for field in ("num_experts", "top_k", "renormalize", "scaling", "num_groups", "topk_groups")
    }
    values = {field: single_value(target, field, layers) for field, layers in per_layer.items()}
    d_hidden = single_value(target, "d_hidden", {i: m.experts.d_hidden for i, m in source.moe.items()})
    if values["num_experts"] // values["num_groups"] < 2:
        raise refuse(
            target,
            f"its routers split {values['num_experts']} experts into {values['num_groups']} groups; {target} scores "
            "a group by its two best experts, so every group needs at least 2",
        )
    shared = ungated_shared_width(source, target, "build the MoE with shared_expert_gate=False")
    # the target's shared MLP is n_shared_experts × moe_intermediate_size wide: a shared expert of another width is
    # padded with zero units up to the next multiple (each adds down(silu(0) ⊙ 0) = 0)
    shared = -(-shared // d_hidden) * d_hidden
    suffix = list(range(min(source.moe), len(source.layers)))
    if sorted(source.moe) != suffix:
        dense_inside = [i for i in suffix if i not in source.moe]
        raise refuse(
            target,
            f"layers {dense_inside} are dense but follow an MoE layer; {target} keeps only the first "
            "first_k_dense_replace layers dense (convert a suffix of the layers, e.g. layers: last_half)",
        )
    return SigmoidShape(**values, d_hidden=d_hidden, shared_width=shared or d_hidden, first_dense=min(source.moe))


def sigmoid_tensors(index: int, moe: MoE, width: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Router, bias, experts and shared MLP (or its zero stand-in) of decoder layer ``index``."""
    prefix, experts = f"model.layers.{index}.mlp.", moe.experts
    yield prefix + "gate.weight", moe.router.gate.weight  # [e, d]
    yield prefix + "gate.e_score_correction_bias", moe.router.expert_bias.float()  # [e], fp32 as the target keeps it
    for j in range(experts.num_experts):
        yield f"{prefix}experts.{j}.gate_proj.weight", expert_slice(experts.w_gate, j)  # [h, d]
        yield f"{prefix}experts.{j}.up_proj.weight", expert_slice(experts.w_up, j)  # [h, d]
        yield f"{prefix}experts.{j}.down_proj.weight", expert_slice(experts.w_down, j)  # [d, h]
    shared = moe.shared_expert
    weights = zero_shared(width, moe.d_model, experts.w_up.dtype)  # [s, d], [s, d], [d, s]
    if shared is not None:  # its units first, zero units after them up to the target's width
        own = shared.up.out_features
        weights["gate"][:own], weights["up"][:own] = shared.gate.weight, shared.up.weight
        weights["down"][:, :own] = shared.down.weight
    for ours, tensor in weights.items():
        yield f"{prefix}shared_experts.{ours}_proj.weight", tensor
