"""BAM's soft Mixture of Attention (Zhang et al., "BAM! Just Like That: Simple and Efficient Parameter Upcycling
for Mixture of Experts", arXiv 2408.08274 §3.2).

Every token runs every attention expert and mixes their outputs with a soft router: ``y = Σ_j g_j(x) · Attn_j(x)``,
``g = softmax(W_a x)``. Each expert is a causal RoPE attention with grouped-query heads, copied from one dense model.

* **expert KV** (``shared_kv=False``): expert j keeps its own W_q, W_k, W_v, W_o; the KV cache holds e sets of keys.
* **shared KV** (``shared_kv=True``): one W_k, W_v for all experts (BAM averages the dense models' K and V), one KV
  cache as in the dense model; experts keep W_q and W_o.

All experts run as one attention call: the expert axis is folded into the head axis (``e·h`` query heads), so the
KV cache stores ``e·kv`` (or ``kv``) heads per layer and any cache with ``update(k, v, layer_idx)`` works.
``reference.mixture_of_attention`` is the per-expert loop this is tested against.

Dimension letters: b batch, t new tokens, s keys (cached + new), d model, e experts, h query heads, kv key/value
heads, c head width (hd), F = h·c, G = kv·c; E_kv = 1 (shared KV) or e.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .rotary import apply_rope
from .routers.soft_attention import SoftAttentionRouter
from .routing import Routing


class MixtureOfAttention(nn.Module):
    """Stacked attention experts ``w_q [e, F, d]``, ``w_k``/``w_v [E_kv, G, d]``, ``w_o [e, d, F]`` (+ optional
    biases ``b_q [e, F]``, ``b_k``/``b_v [E_kv, G]``, ``b_o [e, d]``) and a :class:`SoftAttentionRouter`."""

    def __init__(self, d_model: int, num_experts: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 shared_kv: bool = False, bias: bool = False, router_init_std: float = 0.02,
                 layer_idx: int = 0):  # fmt: skip
        super().__init__()
        self.layer_idx = layer_idx  # which of a KV cache's layers holds this module's keys and values
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_experts, self.num_heads, self.num_kv_heads = num_experts, num_heads, num_kv_heads
        self.head_dim = head_dim
        self.shared_kv = shared_kv
        self.router = SoftAttentionRouter(d_model, num_experts, router_init_std)
        kv_experts = 1 if shared_kv else num_experts
        q_width, kv_width = num_heads * head_dim, num_kv_heads * head_dim
        self.w_q = nn.Parameter(torch.empty(num_experts, q_width, d_model))
        self.w_k = nn.Parameter(torch.empty(kv_experts, kv_width, d_model))
        self.w_v = nn.Parameter(torch.empty(kv_experts, kv_width, d_model))
        self.w_o = nn.Parameter(torch.empty(num_experts, d_model, q_width))
        widths = {"b_q": (num_experts, q_width), "b_k": (kv_experts, kv_width), "b_v": (kv_experts, kv_width),
                  "b_o": (num_experts, d_model)}  # fmt: skip
        for name, shape in widths.items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape)) if bias else None)
        for weight in (self.w_q, self.w_k, self.w_v, self.w_o):
            nn.init.normal_(weight, std=d_model**-0.5)
        self.last_routing: Routing | None = None

    @property
    def d_model(self) -> int:
        return self.w_q.shape[-1]

    def project(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x (b, t, d)`` through every expert's projection -> ``(b, experts·heads, t, c)``, expert-major."""
        b, t, _ = x.shape
        y = torch.einsum("btd,efd->betf", x, weight)  # (b, e, t, f)
        if bias is not None:
            y = y + bias[None, :, None]
        y = y.view(b, weight.shape[0], t, -1, self.head_dim)  # (b, e, t, heads, c)
        return y.transpose(2, 3).reshape(b, -1, t, self.head_dim)  # (b, e·heads, t, c)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                cache=None) -> torch.Tensor:  # fmt: skip
        """``x (b, t, d)``, RoPE ``cos``/``sin (b|1, t, c)``, boolean ``mask (b|1, 1, t, s)`` or None for plain causal
        attention; ``cache.update(k, v, layer_idx)`` appends this layer's keys and returns all of them."""
        b, t, d = x.shape
        e, h, c = self.num_experts, self.num_heads, self.head_dim
        routing = self.router(x.reshape(-1, d))
        self.last_routing = routing
        gates = routing.weights.view(b, t, e).to(x.dtype)  # (b, t, e)
        q = apply_rope(self.project(x, self.w_q, self.b_q), cos, sin)  # (b, e·h, t, c)
        k = apply_rope(self.project(x, self.w_k, self.b_k), cos, sin)  # (b, E_kv·kv, t, c), cached after RoPE
        v = self.project(x, self.w_v, self.b_v)  # (b, E_kv·kv, t, c)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (b, E_kv·kv, s, c)
        k, v = self.expand_kv(k), self.expand_kv(v)  # (b, e·h, s, c): query head (j, i) reads kv head (j, i // groups)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=c**-0.5)
        y = y.view(b, e, h, t, c).permute(0, 3, 1, 2, 4).reshape(b, t, e, h * c)  # (b, t, e, F)
        out = torch.einsum("bteF,edF->btd", y * gates[..., None], self.w_o)  # Σ_j g_j · W_o[j] y_j
        if self.b_o is not None:
            out = out + gates @ self.b_o  # Σ_j g_j · b_o[j]
        return out

    def expand_kv(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, E_kv·kv, s, c)`` -> ``(b, e·h, s, c)``: shared keys serve every expert, a kv head its query group."""
        b, _, s, c = x.shape
        e, h, kv = self.num_experts, self.num_heads, self.num_kv_heads
        x = x.view(b, -1, kv, 1, s, c)  # (b, E_kv, kv, 1, s, c)
        return x.expand(b, e, kv, h // kv, s, c).reshape(b, e * h, s, c)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, shared_kv={self.shared_kv}")  # fmt: skip
