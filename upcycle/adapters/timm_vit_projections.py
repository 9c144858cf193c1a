"""D2DMoE's attention-projection stage, structure only (Szatkowski et al., arXiv 2310.04361, §3.4): each attention
projection of a timm ViT (Q, K, V and the output projection O) becomes a 2-layer ReLU MLP of the same cost, so the
projections can then be sparsified and split into experts exactly like the FFNs. Training the MLPs to reproduce
the original projections is :func:`upcycle.methods.d2dmoe.distill.distill_attention_projections`.

timm's ``Attention`` computes Q, K and V with one fused Linear ``qkv`` (d -> 3a) and reshapes its output; the
replacement :class:`SplitQKV` returns the concatenation ``[Q | K | V]`` of three MLPs, so timm's forward runs
unchanged. Each MLP is a timm ``Mlp`` (fc1, ReLU, fc2), which the ViT adapter reads as an FFN.

Cost: a Linear i -> o costs i·o multiply-accumulates per token, an MLP i -> h -> o costs h·(i + o). They are equal
at h = i·o / (i + o), which is d/2 when i = o = d; ``hidden_ratio`` scales that equal-cost width (0.5 = equal).
Dimension letters: b batch, n tokens, d model width, a attention width (heads × head dim, usually d), h MLP hidden.

timm is imported inside the functions: the ViT adapter imports this module, and ``import upcycle`` must not
import timm.
"""

from __future__ import annotations

import torch
from torch import nn

from ..record import record_of

PROJECTIONS = ("qkv.q", "qkv.k", "qkv.v", "proj")  # replaced modules under each block's ``attn``, in forward order
# student MLP (under blocks.i.attn) -> (teacher module under blocks.i.attn, which third of its output, if split)
_TARGETS = {"qkv.q": ("qkv", 0), "qkv.k": ("qkv", 1), "qkv.v": ("qkv", 2), "proj": ("proj", None)}


class SplitQKV(nn.Module):
    """Stands in for timm's fused ``qkv`` Linear: three separate modules whose outputs are concatenated."""

    def __init__(self, q: nn.Module, k: nn.Module, v: nn.Module, hidden: int):
        super().__init__()
        self.q, self.k, self.v = q, k, v
        self.hidden = hidden  # the MLPs' width, kept here because q/k/v may later become MoE layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, n, d] -> [b, n, 3a]
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def equal_cost_hidden(fan_in: int, fan_out: int, hidden_ratio: float) -> int:
    """MLP width for ``hidden_ratio`` × twice the equal-cost width ``i·o / (i + o)`` (ratio 0.5: equal cost)."""
    return max(1, round(hidden_ratio * 2 * fan_in * fan_out / (fan_in + fan_out)))


def has_mlp_projections(block: nn.Module) -> bool:
    return isinstance(getattr(getattr(block, "attn", None), "qkv", None), SplitQKV)


def projection_hidden(model: nn.Module) -> int | None:
    """The projection MLPs' width, or None if the model's projections are the original Linears."""
    blocks = [block for block in getattr(model, "blocks", []) if has_mlp_projections(block)]
    return blocks[0].attn.qkv.hidden if blocks else None


def replace_attention_projections(model: nn.Module, hidden_ratio: float = 0.5, generator: torch.Generator | None = None,
                                  *, hidden: int | None = None) -> nn.Module:  # fmt: skip
    """Replace ``blocks[i].attn.qkv`` by a :class:`SplitQKV` of three ReLU ``Mlp``s and ``blocks[i].attn.proj`` by
    a ReLU ``Mlp``, in place; returns ``model``. ``hidden`` (an explicit width) overrides ``hidden_ratio``.

    The MLPs are freshly initialised (from ``generator`` when given) and keep the original layers' bias choice;
    they only approximate the projections once distilled. Every block's attention must be timm's ``Attention``.
    """
    from timm.layers import Attention

    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(isinstance(getattr(block, "attn", None), Attention) for block in blocks):
        raise ValueError("attention projections can be replaced only in timm ViTs whose blocks use timm's Attention")
    if hidden_ratio <= 0 or (hidden is not None and hidden < 1):
        raise ValueError(f"the MLP width must be positive, got hidden_ratio={hidden_ratio}, hidden={hidden}")
    if projection_hidden(model) is not None:
        raise ValueError("the attention projections of this model are already MLPs")
    for block in blocks:
        attn = block.attn
        d, a = attn.qkv.in_features, attn.attn_dim
        width = hidden or equal_cost_hidden(d, a, hidden_ratio)  # the same for qkv (d -> a) and proj (a -> d)
        has_bias = attn.qkv.bias is not None
        q, k, v = (_relu_mlp(d, width, a, has_bias, attn.qkv.weight, generator) for _ in range(3))
        attn.qkv = SplitQKV(q, k, v, width)
        attn.proj = _relu_mlp(a, width, attn.proj.out_features, attn.proj.bias is not None, attn.proj.weight,
                              generator)  # fmt: skip
    record = record_of(model)
    if record is not None and record.source is not None:  # its skeleton description must now rebuild the MLPs too
        record.source["attention_projection_hidden"] = width
    return model


def _relu_mlp(fan_in: int, hidden: int, fan_out: int, bias: bool, like: torch.Tensor,
              generator: torch.Generator | None) -> nn.Module:  # fmt: skip
    """A timm ``Mlp`` i -> h -> o with ReLU, initialised as torch's Linear is (U(±1/√fan_in), weights and biases)
    but from ``generator``, on the CPU where that generator lives, then moved to ``like``'s device and dtype."""
    from timm.layers import Mlp

    mlp = Mlp(fan_in, hidden, fan_out, act_layer=nn.ReLU, bias=bias)
    with torch.no_grad():
        for layer in (mlp.fc1, mlp.fc2):
            bound = layer.in_features**-0.5
            for param in (layer.weight, layer.bias):
                if param is not None:
                    param.uniform_(-bound, bound, generator=generator)
    return mlp.to(device=like.device, dtype=like.dtype)


def projection_pairs(model: nn.Module, teacher: nn.Module) -> list[tuple[str, nn.Module, str, int | None]]:
    """(student MLP name, the MLP, teacher module name, output third) for every projection MLP, in forward order."""
    blocks, teacher_blocks = getattr(model, "blocks", []), getattr(teacher, "blocks", [])
    if not any(has_mlp_projections(b) for b in blocks) or len(blocks) != len(teacher_blocks):
        raise ValueError("distillation needs a model with MLP projections (replace_attention_projections) and its "
                         "dense teacher of the same depth")  # fmt: skip
    pairs = []
    for i, block in enumerate(blocks):
        if not has_mlp_projections(block):
            continue
        for projection in PROJECTIONS:
            teacher_part, third = _TARGETS[projection]
            mlp = block.attn.get_submodule(projection)
            if not all(hasattr(mlp, a) for a in ("fc1", "act", "fc2")):
                raise ValueError(f"blocks.{i}.attn.{projection} is no longer an MLP (already converted?)")
            if not isinstance(teacher_blocks[i].attn.get_submodule(teacher_part), nn.Linear):
                raise ValueError(f"the teacher's blocks.{i}.attn.{teacher_part} is not the original Linear")
            pairs.append((f"blocks.{i}.attn.{projection}", mlp, f"blocks.{i}.attn.{teacher_part}", third))
    return pairs
