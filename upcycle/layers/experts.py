"""Stacked expert weights and their compute.

All experts of a layer live in stacked tensors in the ``[e, out, in]`` layout (the layout of ``nn.Linear`` with an
expert axis in front), so recycling methods write them by slicing and backends read them without copies:

    w_up   [e, h, d]  b_up   [e, h]     first projection (the only one of a plain FFN)
    w_gate [e, h, d]  b_gate [e, h]     activated branch of a gated FFN (SwiGLU), optional
    w_down [e, d, h]  b_down [e, d]     second projection
    shared_bias [d]                     added once per token, unweighted (D2DMoE: W2's bias split out of the experts)
    norm_weight/norm_bias [e, h]        optional LayerNorm over each expert's hidden units (timm SwiGLU with
                                        ``norm_layer``, e.g. EVA-02); applied after the activation/gating

Expert i computes ``W_down[i] · act(W_gate[i] x) ⊙ (W_up[i] x)`` (gated) or ``W_down[i] · act(W_up[i] x)`` (plain).

Sparse routing is executed by a *backend* chosen by name (``eager`` is the per-expert reference loop; the default
``grouped`` runs padded batched matmuls, ``grouped_mm`` one grouped GEMM per projection over the jagged groups,
``sorted`` one matmul per expert); dense slot routing runs every expert on its own slots with one
batched matmul.
Dimension letters: t tokens, b examples, n tokens per example, d model, h hidden, e experts, k choices, s slots.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .activations import get_activation
from .backends import get_backend
from .routing import Routing

_STATISTICS_BLOCK = 2**25  # elements of one group's outputs in per_expert_statistics (128 MB in fp32)


class ExpertWeights(NamedTuple):
    """One expert's tensors (views into the stacked ones; ``None`` where the layer has no such tensor)."""

    w_up: torch.Tensor
    b_up: torch.Tensor | None
    w_gate: torch.Tensor | None
    b_gate: torch.Tensor | None
    w_down: torch.Tensor
    b_down: torch.Tensor | None
    norm_weight: torch.Tensor | None
    norm_bias: torch.Tensor | None


class ExpertStatistics(NamedTuple):
    """Per-token, per-expert measurements of a layer's experts (see :meth:`Experts.per_expert_statistics`)."""

    output_norms: torch.Tensor  # [t, e] ‖expert_i(x)‖₂ without the shared bias
    activation_sums: torch.Tensor  # [t, e] Σ of expert i's hidden activations


class Experts(nn.Module):
    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        activation: str = "gelu",
        gated: bool = False,
        bias: bool | tuple[bool, bool] = True,
        shared_bias: bool = False,
        backend: str = "auto",
        hidden_norm_eps: float | None = None,
        initialize: bool = True,
    ):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if d_model < 1 or d_hidden < 1:
            raise ValueError(f"d_model and d_hidden must be >= 1, got d_model={d_model}, d_hidden={d_hidden}")
        self.num_experts, self.d_model, self.d_hidden = num_experts, d_model, d_hidden
        self.activation = activation
        self.act = get_activation(activation)
        self.act_inplace = get_activation(activation, inplace=True)  # where autograd records nothing
        self.gated = gated
        self.backend = backend  # validated by the setter below

        e, d, h = num_experts, d_model, d_hidden
        bias_in, bias_out = (bias, bias) if isinstance(bias, bool) else bias  # (first layer, second layer)
        self.w_up = nn.Parameter(torch.empty(e, h, d))
        self.w_gate = nn.Parameter(torch.empty(e, h, d)) if gated else None
        self.w_down = nn.Parameter(torch.empty(e, d, h))
        self.b_up = nn.Parameter(torch.zeros(e, h)) if bias_in else None
        self.b_gate = nn.Parameter(torch.zeros(e, h)) if bias_in and gated else None
        self.b_down = nn.Parameter(torch.zeros(e, d)) if bias_out else None
        self.shared_bias = nn.Parameter(torch.zeros(d)) if shared_bias else None
        self.hidden_norm_eps = hidden_norm_eps  # None: no hidden LayerNorm
        self.norm_weight = nn.Parameter(torch.ones(e, h)) if hidden_norm_eps is not None else None
        self.norm_bias = nn.Parameter(torch.zeros(e, h)) if hidden_norm_eps is not None else None
        if initialize:  # recycling methods overwrite every tensor and skip this (~30% of conversion time)
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Per-expert ``nn.Linear`` default init (Kaiming-uniform weights, uniform biases)."""
        for weight, b in ((self.w_up, self.b_up), (self.w_gate, self.b_gate), (self.w_down, self.b_down)):
            if weight is None:
                continue
            bound = 1.0 / math.sqrt(weight.shape[-1])
            nn.init.uniform_(weight, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)
        if self.shared_bias is not None:
            nn.init.zeros_(self.shared_bias)

    def spec(self) -> dict:
        """Constructor arguments that rebuild this module's structure (not its weights). The backend is left out: it
        is a runtime choice of whoever runs the model, so a saved model loads with the default one."""
        return {
            "num_experts": self.num_experts, "d_model": self.d_model, "d_hidden": self.d_hidden,
            "activation": self.activation, "gated": self.gated,
            "bias": [self.b_up is not None, self.b_down is not None],
            "shared_bias": self.shared_bias is not None,
            "hidden_norm_eps": self.hidden_norm_eps,
        }  # fmt: skip

    @classmethod
    def from_spec(cls, spec: dict) -> Experts:
        """Inverse of :meth:`spec` (also after a JSON round trip, which turns the bias pair into a list). A
        ``backend`` in a spec saved by an older version is ignored: the module gets the default backend."""
        arguments = {key: value for key, value in spec.items() if key != "backend"}
        return cls(**{**arguments, "bias": tuple(spec["bias"])})

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        get_backend(name)  # raises with the list of registered names
        self._backend = name

    # ---- compute ------------------------------------------------------------------------------------------------
    def stacked_weights(self) -> tuple[torch.Tensor | None, ...]:
        """The stacked tensors in :class:`ExpertWeights` order."""
        return (self.w_up, self.b_up, self.w_gate, self.b_gate, self.w_down, self.b_down,
                self.norm_weight, self.norm_bias)  # fmt: skip

    def expert_weights(self, i: int) -> ExpertWeights:
        """Expert ``i``'s tensors, indexed out of the stacked ones."""
        return ExpertWeights(*(None if t is None else t[i] for t in self.stacked_weights()))

    def unbind_experts(self) -> list[ExpertWeights]:
        """Every expert's tensors, unbound from the stacked ones in one call per tensor.

        A loop over experts should read these rather than index ``w[i]`` per expert: the backward of each index
        scatters into its own full-size zero gradient ``[e, ...]`` (e of them summed), while an unbind's backward
        stacks the per-expert gradients once (64 experts: 23.7× -> 2.6× the dense FFN's training step).
        """
        columns = [[None] * self.num_experts if t is None else t.unbind(0) for t in self.stacked_weights()]
        return [ExpertWeights(*row) for row in zip(*columns, strict=True)]

    def expert_forward(self, i: int, x: torch.Tensor, weights: ExpertWeights | None = None) -> torch.Tensor:
        """Expert ``i`` on rows ``x [m, d]`` -> ``[m, d]`` (no routing weight, no shared bias); ``weights``: its
        tensors from :meth:`unbind_experts` (indexed out of the stacked ones when not given)."""
        w = self.expert_weights(i) if weights is None else weights
        up = F.linear(x, w.w_up, w.b_up)  # [m, h]
        gate = None if w.w_gate is None else F.linear(x, w.w_gate, w.b_gate)
        hidden = self.hidden_units(up, gate, w.norm_weight, w.norm_bias)
        return F.linear(hidden, w.w_down, w.b_down)

    def hidden_units(
        self,
        up: torch.Tensor,
        gate: torch.Tensor | None,
        norm_weight: torch.Tensor | None,
        norm_bias: torch.Tensor | None,
        hidden_dropout: float = 0.0,
    ) -> torch.Tensor:
        """``act(up)`` or ``act(gate) ⊙ up``, then dropout and the hidden LayerNorm (``norm_weight``/``norm_bias``
        broadcast against the hidden units: ``[h]``, ``[e, 1, h]`` or one row per pair). Every backend goes through
        here. With autograd off (inference) the activation and the gating product overwrite their inputs, which
        the projections just allocated, so no further hidden-sized temporary is made."""
        inplace = not torch.is_grad_enabled()
        act = self.act_inplace if inplace else self.act
        if gate is not None:
            up = act(gate).mul_(up) if inplace else act(gate) * up
        hidden = up if gate is not None else act(up)
        if hidden_dropout:
            hidden = F.dropout(hidden, hidden_dropout)
        if norm_weight is not None:
            hidden = F.layer_norm(hidden, hidden.shape[-1:], eps=self.hidden_norm_eps)
            hidden = torch.addcmul(norm_bias, hidden, norm_weight)
        return hidden

    def forward_stacked(self, xs: torch.Tensor, hidden_dropout: float = 0.0) -> torch.Tensor:
        """Expert i on its own rows ``xs[i]``: ``[e, m, d] -> [e, m, d]`` with batched matmuls. ``hidden_dropout``:
        dropout on the hidden units where timm's ``Mlp`` has ``drop1`` (the caller passes 0 outside training)."""
        return _batched_linear(self._hidden_stacked(xs, hidden_dropout), self.w_down, self.b_down)  # [e, m, d]

    def forward_part(self, x: torch.Tensor, part: slice, weights: torch.Tensor) -> torch.Tensor:
        """The weighted sum of experts ``part`` (c consecutive ids), each on every row of ``x [m, d]``, with
        ``weights [c, m]`` (expert j's routing weight of each row) -> ``[m, d]`` (no shared bias). The part's first
        projections are one ``[c·h, d]`` matrix, a view of the stacked weights, so they cost one matmul as wide as
        the part; the second projections one batched matmul. The weights scale the hidden units before it (and the
        second biases): c·h multiplications where weighting the outputs would cost a matmul of its own."""
        m, c = x.shape[0], part.stop - part.start
        up = F.linear(x, _flat(self.w_up[part]), _flat(_part(self.b_up, part))).view(m, c, self.d_hidden)
        gate = None if self.w_gate is None else F.linear(x, _flat(self.w_gate[part]), _flat(_part(self.b_gate, part)))
        gate = None if gate is None else gate.view(m, c, self.d_hidden)
        hidden = self.hidden_units(up, gate, _part(self.norm_weight, part), _part(self.norm_bias, part))  # [m, c, h]
        scale = weights.T.unsqueeze(-1).to(hidden.dtype)  # [m, c, 1]
        hidden = hidden.mul_(scale) if not torch.is_grad_enabled() else hidden * scale
        out = torch.bmm(hidden.transpose(0, 1), self.w_down[part].transpose(1, 2)).sum(0)  # [c, m, d] -> [m, d]
        if self.b_down is None:
            return out
        return out + (scale * self.b_down[part].to(out.dtype)).sum(1)  # Σ_j w_j b_j: [m, c, 1] * [c, d] -> [m, d]

    def _hidden_stacked(self, xs: torch.Tensor, hidden_dropout: float = 0.0, part: slice | None = None) -> torch.Tensor:
        """The hidden units each expert feeds its down projection: ``[e, m, d] -> [e, m, h]``; with ``part``, only
        those experts (``xs`` then holds rows for them alone)."""
        up = _batched_linear(xs, _part(self.w_up, part), _part(self.b_up, part))  # [e, m, h]
        gate = None if self.w_gate is None else _batched_linear(xs, _part(self.w_gate, part), _part(self.b_gate, part))
        norm_weight, norm_bias = _part(self.norm_weight, part), _part(self.norm_bias, part)
        if norm_weight is not None:
            norm_weight, norm_bias = norm_weight.unsqueeze(1), norm_bias.unsqueeze(1)  # [e, 1, h]
        return self.hidden_units(up, gate, norm_weight, norm_bias, hidden_dropout)

    def per_expert_statistics(self, x: torch.Tensor) -> ExpertStatistics:
        """Every expert on every token of ``x [t, d]``: what routers trained apart from the backbone regress on.

        ``output_norms [t, e]``: L2 norm of expert i's output, shared bias excluded (it runs whatever the router
        picks): D2DMoE's target (arXiv 2310.04361, §3.3). ``activation_sums [t, e]``: sum of expert i's hidden
        activations: MoEfication's target (arXiv 2110.01786, §3.2). Costs one dense FFN pass; callers that want
        targets wrap it in ``torch.no_grad()``. Experts run in groups so the ``[c, t, d]`` outputs stay bounded
        (every expert's output at once is e times the layer's: 512 experts on a ViT-B batch would be ~40 GB).
        """
        group = max(1, _STATISTICS_BLOCK // max(1, x.shape[0] * self.d_model))  # experts per group
        norms, sums = [], []
        for start in range(0, self.num_experts, group):
            part = slice(start, min(start + group, self.num_experts))
            xs = x.unsqueeze(0).expand(part.stop - part.start, -1, -1)  # [c, t, d]; each expert sees every token
            hidden = self._hidden_stacked(xs, part=part)  # [c, t, h]
            out = _batched_linear(hidden, self.w_down[part], _part(self.b_down, part))  # [c, t, d]
            norms.append(out.norm(dim=-1))
            sums.append(hidden.sum(-1))
        return ExpertStatistics(torch.cat(norms).T, torch.cat(sums).T)  # [t, e] each

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Execute ``routing``: sparse takes ``x [t, d]``, dense (slots) takes ``x [b, n, d]``; same shape out."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"experts expect inputs with last dim {self.d_model}, got {tuple(x.shape)}")
        if routing.num_experts != self.num_experts:
            raise ValueError(f"routing is over {routing.num_experts} experts, this layer has {self.num_experts}")
        if routing.is_sparse:
            y = get_backend(self.backend)(self, x, routing.indices, routing.weights, routing.mask)
        else:
            y = self._forward_slots(x, routing)
        return y if self.shared_bias is None else y + self.shared_bias

    def forward_slots(self, slots: torch.Tensor, slots_per_expert: int, hidden_dropout: float = 0.0) -> torch.Tensor:
        """Expert ``j // s`` on slot j of every example: ``[b, e*s, d] -> [b, e*s, d]`` (no mixing, no shared bias)."""
        b, _, d = slots.shape
        e, s = self.num_experts, slots_per_expert
        per_expert = slots.reshape(b, e, s, d).transpose(0, 1).reshape(e, b * s, d)
        out = self.forward_stacked(per_expert, hidden_dropout)  # [e, b*s, d]
        return out.reshape(e, b, s, d).transpose(0, 1).reshape(b, e * s, d)

    def _forward_slots(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        slots = torch.einsum("bnS,bnd->bSd", routing.dispatch.to(x.dtype), x)  # [b, e*s, d]
        out = self.forward_slots(slots, routing.slots_per_expert)
        return torch.einsum("bnS,bSd->bnd", routing.combine.to(out.dtype), out)  # [b, n, d]

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
            f"activation={self.activation}, gated={self.gated}, "
            f"bias=({self.b_up is not None}, {self.b_down is not None}), "
            f"shared_bias={self.shared_bias is not None}, hidden_norm={self.norm_weight is not None}, "
            f"backend={self.backend!r}"
        )


def _batched_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [e, m, in] @ weight[e, out, in]^T (+ bias [e, out])`` -> ``[e, m, out]``."""
    if bias is None:
        return torch.bmm(x, weight.transpose(1, 2))
    return torch.baddbmm(bias.unsqueeze(1).to(x.dtype), x, weight.transpose(1, 2).to(x.dtype))


def _flat(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """Stacked per-expert tensors ``[c, h, ...]`` as one ``[c·h, ...]`` (a view when contiguous)."""
    return None if tensor is None else tensor.flatten(0, 1)


def _part(tensor: torch.Tensor | None, part: slice | None) -> torch.Tensor | None:
    """Some experts' slice of a stacked ``[e, ...]`` tensor (all of it when ``part`` is None; None stays None)."""
    return tensor if tensor is None or part is None else tensor[part]
