"""Sparse upcycling (Komatsuzaki et al., arXiv 2212.05055) and granular upcycling with virtual groups
(He et al., NVIDIA, arXiv 2410.07524).

Copies: every expert is an exact copy of the dense FFN, optionally with small Gaussian noise (std relative to each
weight matrix's own std) to break symmetry. With top-k routing and renormalised weights the MoE equals the dense
model at step 0.

Granular (G > 1): the hidden units are split into G contiguous shards; E copies of the G shards give E·G
fine-grained experts (expert ``c·G + g`` = shard g of copy c). Router rows are tied inside each *virtual group*
of G (one full copy), so a token picks whole copies when top-k is a multiple of G and equivalence is kept.
Each shard carries b_down / G, so a whole group adds the bias once.
Weight scaling restores the dense output scale. With renormalised top-k over T shards of tied groups, every shard
gets weight 1/T, so the layer outputs FFN/G; with softmax-then-top-k *without* renormalisation at a uniform router,
every shard gets 1/(E·G), so it outputs T/(E·G²)·FFN. ``weight_scaling``:
  - ``auto`` (default): multiply W_down and b_down by G (renormalised) or E·G²/T (not renormalised): exact for any
    activation; a no-op for plain renormalised copies;
  - ``paper``: the paper's form for softmax-then-top-k: every projection matrix times (E·G²/T)^(1/3) and b_down
    times E·G²/T; exact for squared-ReLU FFNs (Nemotron), approximate for others;
  - ``none``: no scaling.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ...adapters.dense_ffn import DenseFFN
from ...config import StrictModel
from ...layers import FFN, Experts, MoE
from ...recycling import register_method
from ...recycling.routers import build_recipe_router


class SparseUpcyclingOptions(StrictModel):
    noise_std: float = Field(0.0, ge=0, description="noise on each copy, relative to each weight's std")
    granularity: int = Field(1, ge=1, description="G: shards per copy (granular upcycling)")
    weight_scaling: Literal["auto", "paper", "none"] = Field("auto", description="see module docstring")


def experts_for(dense: DenseFFN, num_experts: int, d_hidden: int, shared_bias: bool = False) -> Experts:
    """Experts of the dense FFN's kind (activation, gating, biases, hidden norm) and dtype, left uninitialised:
    the caller fills every tensor from the dense weights."""
    experts = Experts(
        num_experts, dense.d_model, d_hidden, activation=dense.activation, gated=dense.gated,
        bias=(dense.b_up is not None, dense.b_down is not None and not shared_bias), shared_bias=shared_bias,
        hidden_norm_eps=None if dense.hidden_norm is None else dense.hidden_norm[2], initialize=False,
    )  # fmt: skip
    return experts.to(dense.w_up.dtype)


@torch.no_grad()
def fill_expert(experts: Experts, i: int, dense: DenseFFN, hidden_units: torch.Tensor | slice) -> None:
    """Expert i := the dense FFN restricted to ``hidden_units`` (rows of W_up/W_gate, columns of W_down)."""
    experts.w_up[i].copy_(dense.w_up[hidden_units])
    experts.w_down[i].copy_(dense.w_down[:, hidden_units])
    if experts.w_gate is not None:
        experts.w_gate[i].copy_(dense.w_gate[hidden_units])
    if experts.b_up is not None:
        experts.b_up[i].copy_(dense.b_up[hidden_units])
    if experts.b_gate is not None:
        experts.b_gate[i].copy_(dense.b_gate[hidden_units])
    if experts.b_down is not None:
        experts.b_down[i].copy_(dense.b_down)
    if experts.norm_weight is not None:
        experts.norm_weight[i].copy_(dense.hidden_norm[0][hidden_units])
        experts.norm_bias[i].copy_(dense.hidden_norm[1][hidden_units])


@register_method(
    "sparse_upcycling",
    paper="https://arxiv.org/abs/2212.05055",
    description="E copies of the dense FFN + a new router; granular shards with virtual groups (arXiv 2410.07524)",
    options=SparseUpcyclingOptions,
)
@torch.no_grad()
def sparse_upcycling(dense: DenseFFN, config, generator: torch.Generator) -> MoE:
    options = SparseUpcyclingOptions(**config.options)
    copies, shards = config.num_experts, options.granularity
    experts = granular_experts(dense, copies, shards, options.noise_std, options.weight_scaling, config, generator)
    return MoE(virtual_group_router(config, dense.d_model, copies, shards, generator), experts)


def granular_experts(dense: DenseFFN, copies: int, shards: int, noise_std: float, weight_scaling: str, config,
                     generator: torch.Generator) -> Experts:  # fmt: skip
    """``copies`` × ``shards`` experts: expert ``c·G + g`` is shard g of copy c (+ noise), scaled so that the layer
    reproduces ``dense`` under ``config``'s top-k (see the module docstring)."""
    if dense.d_hidden % shards:
        raise ValueError(f"granularity {shards} does not divide the FFN hidden size {dense.d_hidden}")
    if shards > 1 and dense.hidden_norm is not None:
        raise ValueError("granular upcycling cannot shard an FFN with a LayerNorm over its hidden units")
    shard_width = dense.d_hidden // shards
    experts = experts_for(dense, copies * shards, shard_width)
    for copy in range(copies):
        for shard in range(shards):
            fill_expert(experts, copy * shards + shard, dense, slice(shard * shard_width, (shard + 1) * shard_width))
    if noise_std > 0:
        for name, weight in experts.named_parameters():
            if name.startswith("w_"):
                scale = noise_std * weight.std()
                weight.add_(torch.randn(weight.shape, generator=generator, dtype=weight.dtype) * scale)
    if shards > 1 and experts.b_down is not None:
        experts.b_down.div_(shards)
    _scale_weights(experts, weight_scaling, copies, shards, config.top_k, config.router.renormalize)
    return experts


def virtual_group_router(config, d_model: int, copies: int, shards: int, generator: torch.Generator):
    """The recipe's router over ``copies · shards`` experts, its rows tied inside each virtual group of ``shards``
    (one whole copy), so a token's top-k picks whole copies and the layer starts as the dense FFN."""
    router = build_recipe_router(config, d_model, copies * shards, generator)
    if shards > 1 and hasattr(router, "gate"):
        rows = router.gate.weight.view(copies, shards, -1)
        rows.copy_(rows[:, :1].clone().expand_as(rows))  # clone: source and destination overlap
    return router


def _scale_weights(experts: Experts, mode: str, copies: int, shards: int, top_k: int, renormalize: bool) -> None:
    if mode == "none":
        return
    if mode == "auto":
        factor = shards if renormalize else copies * shards * shards / top_k
        experts.w_down.mul_(factor)
    else:  # "paper": E·G²/T spread over the projection matrices
        factor = copies * shards * shards / top_k
        per_matrix = factor ** (1 / 3)
        for weight in (experts.w_up, experts.w_gate, experts.w_down):
            if weight is not None:
                weight.mul_(per_matrix)
        for bias in (experts.b_up, experts.b_gate):
            if bias is not None:
                bias.mul_(per_matrix)
    if experts.b_down is not None:
        experts.b_down.mul_(factor)


def restricted(dense: DenseFFN, units: torch.Tensor, b_down: bool) -> DenseFFN:
    """The dense FFN on ``units`` only (their rows of W_up / W_gate, columns of W_down), b_down kept if asked."""

    def rows(tensor):
        return None if tensor is None else tensor.index_select(0, units)

    return DenseFFN(w_up=rows(dense.w_up), w_down=dense.w_down.index_select(1, units), activation=dense.activation,
                    b_up=rows(dense.b_up), w_gate=rows(dense.w_gate), b_gate=rows(dense.b_gate),
                    b_down=dense.b_down if b_down else None)  # fmt: skip


def dense_module(dense: DenseFFN, scale: float = 1.0) -> FFN:
    """An FFN module equal to ``dense`` times ``scale`` (zeros where ``dense`` lacks a bias the module has): the
    shared expert of methods that carve one out of the dense FFN."""
    biased = any(b is not None for b in (dense.b_up, dense.b_gate, dense.b_down))
    ffn = FFN(dense.d_model, dense.d_hidden, dense.activation, gated=dense.gated, bias=biased)
    ffn = ffn.to(dense.w_up.dtype)
    pairs = [(ffn.up, dense.w_up, dense.b_up), (ffn.down, dense.w_down * scale, dense.b_down)]
    if ffn.gate is not None:
        pairs.append((ffn.gate, dense.w_gate, dense.b_gate))
    for linear, weight, bias in pairs:
        linear.weight.copy_(weight)
        if linear.bias is not None:
            linear.bias.copy_(torch.zeros_like(linear.bias) if bias is None else bias)
    if ffn.down.bias is not None:
        ffn.down.bias.mul_(scale)
    return ffn
