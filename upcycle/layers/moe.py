"""The MoE layer: router + experts (+ an optional shared expert). A drop-in for an FFN, ``[..., d] -> [..., d]``.

Any leading dimensions are accepted: ViT tokens ``[b, n, d]``, a ConvNeXt grid ``[b, H, W, d]``, LM sequences,
or flat tokens ``[t, d]``. Sparse routers see all tokens flattened to ``[t, d]``, padding left out (a sequence input
inside ``real_tokens(attention_mask)``: padding gets a zero output); slot routers see ``[b, n, d]`` with n = every
position of one example (a 2-D input counts as one example).

The layer returns only the output tensor (so it can replace an FFN inside timm / transformers blocks) and keeps the
latest :class:`Routing` on ``self.last_routing``; ``collect_aux_losses(model)`` reads them explicitly.
Shared expert: a dense FFN every token passes through, optionally scaled by ``sigmoid(w·x)`` (Qwen2-MoE).
The experts are an :class:`Experts` or, behind a slot router, :class:`DualPathExperts` (SpheroMoE's core and
universal groups); the layer reads only their ``num_experts`` and ``d_model``.
"""

from __future__ import annotations

import torch
from torch import nn

from .dual_experts import DualPathExperts
from .experts import Experts
from .ffn import FFN
from .one_row import one_row_kernels
from .real_tokens import real_rows
from .routers.base import Router
from .routing import Routing


class MoE(nn.Module):
    def __init__(
        self,
        router: Router,
        experts: Experts | DualPathExperts,
        shared_expert: FFN | None = None,
        shared_expert_gate: bool = False,
    ):
        super().__init__()
        if router.num_experts != experts.num_experts:
            raise ValueError(f"router has {router.num_experts} experts but experts hold {experts.num_experts}")
        if router.d_model != experts.d_model:
            raise ValueError(f"router width {router.d_model} differs from the experts' d_model {experts.d_model}")
        if shared_expert is not None and shared_expert.up.in_features != experts.d_model:
            raise ValueError(
                f"shared expert width {shared_expert.up.in_features} differs from d_model {experts.d_model}"
            )
        if shared_expert_gate and shared_expert is None:
            raise ValueError("shared_expert_gate needs a shared_expert")
        self.router, self.experts, self.shared_expert = router, experts, shared_expert
        self.shared_expert_gate = nn.Linear(experts.d_model, 1, bias=False) if shared_expert_gate else None
        self.last_routing: Routing | None = None

    @property
    def d_model(self) -> int:
        return self.experts.d_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, self.last_routing = self.forward_with_routing(x)
        return y

    def forward_with_routing(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"MoE layer expects last dim {self.d_model}, got input of shape {tuple(x.shape)}")
        if self.router.kind == "slots":
            examples = x.shape[0] if x.ndim >= 3 else 1
            y, routing = self._compute(x.reshape(examples, -1, self.d_model))  # [b, n, d]
            return y.reshape(x.shape), routing
        tokens = x.reshape(-1, self.d_model)  # [t, d]
        real = real_rows(x) if x.ndim == 3 else None  # [t] bool: padding is neither routed nor computed
        sequences = None  # [t] which example each token is from, for routers with a per-sequence loss
        if x.ndim == 3 and getattr(self.router, "reads_sequences", False):
            sequences = torch.arange(x.shape[0], device=x.device).repeat_interleave(x.shape[1])
        if real is None:
            y, routing = self._compute(tokens, sequences)
            return y.reshape(x.shape), routing
        y_real, routing = self._compute(tokens[real], None if sequences is None else sequences[real])  # [t_real, d]
        y = y_real.new_zeros(tokens.shape).index_put((real.nonzero().squeeze(1),), y_real)
        return y.reshape(x.shape), routing

    def _compute(self, tokens: torch.Tensor, sequences: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing]:
        """Route and compute ``tokens`` ([t, d], or [b, n, d] for slot routers): experts plus the shared expert."""
        with one_row_kernels(tokens):  # one decoding token: every matmul below is one row
            routing = self.router(tokens) if sequences is None else self.router(tokens, sequences)
            y = self.experts(tokens, routing)
            if self.shared_expert is not None:
                shared = self.shared_expert(tokens)
                if self.shared_expert_gate is not None:
                    shared = torch.sigmoid(self.shared_expert_gate(tokens)) * shared
                y = y + shared
        return y, routing


def describe_moe(layer: MoE) -> dict:
    """The structure of an MoE layer as plain data (saved in config.json); ``build_moe`` inverts it."""
    return {
        "router": layer.router.spec(),
        "experts": layer.experts.spec(),
        "shared_expert": None if layer.shared_expert is None else layer.shared_expert.spec(),
        "shared_expert_gate": layer.shared_expert_gate is not None,
        # provenance a recycling method stored on the layer (e.g. which dense hidden units each expert holds)
        "buffers": {
            name: {"shape": list(buffer.shape), "dtype": str(buffer.dtype).removeprefix("torch.")}
            for name, buffer in layer.named_buffers(recurse=False)
        },
    }


def build_moe(spec: dict) -> MoE:
    """An MoE layer with the structure ``spec`` describes (weights freshly initialised)."""
    from .routers import build_router

    router_args = dict(spec["router"])
    router = build_router(router_args.pop("name"), **router_args)
    # specs saved before dual-path experts existed have no "type": they are plain Experts
    experts_spec = spec["experts"]
    is_dual = experts_spec.get("type") == "dual_path"
    experts = DualPathExperts.from_spec(experts_spec) if is_dual else Experts.from_spec(experts_spec)
    shared = None if spec.get("shared_expert") is None else FFN(**spec["shared_expert"])
    layer = MoE(router, experts, shared, bool(spec.get("shared_expert_gate")))
    for name, buffer in spec.get("buffers", {}).items():
        layer.register_buffer(name, torch.zeros(buffer["shape"], dtype=getattr(torch, buffer["dtype"])))
    return layer


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """Every MoE layer of a model with its qualified name, in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, MoE)]


def collect_aux_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each aux loss averaged over the MoE layers that ran in the latest forward (unweighted)."""
    totals: dict[str, list[torch.Tensor]] = {}
    for _, layer in moe_layers(model):
        if layer.last_routing is not None:
            for key, value in layer.last_routing.aux_losses.items():
                totals.setdefault(key, []).append(value)
    return {key: torch.stack(values).mean() for key, values in totals.items()}


def set_backend(model: nn.Module, name: str) -> None:
    """Switch the expert compute backend of every MoE layer of ``model``."""
    for _, layer in moe_layers(model):
        layer.experts.backend = name


def set_tau(model: nn.Module, tau: float) -> None:
    """Dynamic-k threshold τ of every D2DMoE router of ``model`` (one trained router, the whole compute curve)."""
    _set_router_option(model, "tau", tau, "a dynamic-k router (convert with method d2dmoe)")


def set_top_k(model: nn.Module, k: int) -> None:
    """Experts per token of every fixed top-k router of ``model`` (top-k, MoEfication)."""
    _set_router_option(model, "top_k", k, "a fixed top-k router")


def _set_router_option(model: nn.Module, option: str, value, needed: str) -> None:
    routers = [layer.router for _, layer in moe_layers(model) if hasattr(layer.router, option)]
    if not routers:
        raise ValueError(f"cannot set {option}: the model has no MoE layer with {needed}")
    for router in routers:  # each setter validates and records the value in the router's spec
        setattr(router, option, value)
