"""A dense transformers model with some FFNs replaced by Mixture-of-Experts layers, as upcycle converted it.

Written by upcycle's ``hf_generic`` export next to the weights; needs only torch and transformers. Loading builds
the dense family's own class (``config.dense_class``, e.g. ``Gemma2ForCausalLM``) and puts an MoE layer where
upcycle put one, so everything else (attention, norms, embedding scaling, soft-capping, the KV cache, ``generate``)
is the family's own code. The weights keep upcycle's names.

An MoE layer picks experts for each token with one of three routers:

    topk        token-choice top-k (Shazeer et al., arXiv 1701.06538; sparse upcycling, arXiv 2212.05055):
                p = softmax(W_g x) in fp32; the top-k experts by p; weights p (renormalised to sum 1, or all 1)
    dynamic_k   D2DMoE (arXiv 2310.04361, §3.3): r = |MLP(x)| predicts each expert's output norm; expert i runs
                iff r_i >= tau · max_j r_j, weight 1
    moefication MoEfication (arXiv 2110.01786, §3.2): the top-k experts by MLP(x), weight 1

    y = Σ_chosen w_i · expert_i(x) (+ shared_bias) (+ sigmoid(w_s · x) · shared(x))
    expert_i(x) = W_down[i] · LN?(act(W_gate[i] x + b) ⊙ (W_up[i] x + b)) + b_down[i]    (gated; plain: act(W_up x))

Dimension letters: t tokens, d model width, h expert width, e experts, k experts per token.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from .configuration_upcycle_moe import UpcycleMoEConfig

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
    "silu": F.silu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "hard_swish": F.hardswish,
    "identity": lambda x: x,
}


class TopKRouter(nn.Module):
    def __init__(self, d_model: int, num_experts: int, top_k: int, renormalize: bool, unit_weights: bool, bias: bool,
                 **_unused):  # fmt: skip
        super().__init__()
        self.top_k, self.renormalize, self.unit_weights = top_k, renormalize, unit_weights
        self.gate = nn.Linear(d_model, num_experts, bias=bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:  # x [t, d]
        probs = torch.softmax(self.gate(x).float(), dim=-1)  # [t, e]
        weights, indices = probs.topk(self.top_k, dim=-1)  # [t, k]
        if self.unit_weights:
            weights = torch.ones_like(weights)
        elif self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return indices, weights, None


ROUTER_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}  # the router MLP's hidden activation


class MLPRouter(nn.Module):
    """D2DMoE's dynamic-k router or MoEfication's top-k one: an MLP ``d -> hidden -> e`` (ReLU or tanh, no biases)
    scores the experts; the chosen ones are summed with weight 1. Inference only (in training these routers run
    every expert while they are fitted to the frozen backbone, which happens in upcycle)."""

    def __init__(self, name: str, d_model: int, num_experts: int, hidden: int, tau: float = 0.0, top_k: int = 1,
                 activation: str = "relu", **_unused):  # fmt: skip
        super().__init__()
        self.name, self.tau, self.top_k = name, tau, top_k
        self.mlp = nn.Sequential(
            nn.Linear(d_model, hidden, bias=False), ROUTER_ACTIVATIONS[activation](),
            nn.Linear(hidden, num_experts, bias=False),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # x [t, d]
        scores = self.mlp(x).float()  # [t, e]
        if self.name == "moefication":
            indices = scores.topk(self.top_k, dim=-1).indices  # [t, k]
            return indices, scores.new_ones(indices.shape), None
        norms = scores.abs()  # predicted ‖expert_i(x)‖
        t, e = norms.shape
        indices = torch.arange(e, device=x.device).expand(t, e)  # [t, e]: every expert named, the mask says which run
        return indices, norms.new_ones(t, e), norms >= self.tau * norms.amax(-1, keepdim=True)


ROUTERS = {"topk": TopKRouter, "dynamic_k": MLPRouter, "moefication": MLPRouter}


class Experts(nn.Module):
    """Stacked expert weights, ``[e, out, in]`` (``nn.Linear``'s layout with an expert axis in front)."""

    def __init__(self, num_experts: int, d_model: int, d_hidden: int, activation: str, gated: bool, bias: list,
                 shared_bias: bool, hidden_norm_eps: float | None = None, **_unused):  # fmt: skip
        super().__init__()
        e, d, h = num_experts, d_model, d_hidden
        self.act, self.hidden_norm_eps = ACTIVATIONS[activation], hidden_norm_eps
        self.w_up = nn.Parameter(torch.zeros(e, h, d))
        self.w_gate = nn.Parameter(torch.zeros(e, h, d)) if gated else None
        self.w_down = nn.Parameter(torch.zeros(e, d, h))
        self.b_up = nn.Parameter(torch.zeros(e, h)) if bias[0] else None
        self.b_gate = nn.Parameter(torch.zeros(e, h)) if bias[0] and gated else None
        self.b_down = nn.Parameter(torch.zeros(e, d)) if bias[1] else None
        self.shared_bias = nn.Parameter(torch.zeros(d)) if shared_bias else None
        self.norm_weight = nn.Parameter(torch.ones(e, h)) if hidden_norm_eps is not None else None
        self.norm_bias = nn.Parameter(torch.zeros(e, h)) if hidden_norm_eps is not None else None

    def expert(self, i: int, x: torch.Tensor) -> torch.Tensor:  # [m, d] -> [m, d]
        def part(tensor):
            return None if tensor is None else tensor[i]

        hidden = F.linear(x, self.w_up[i], part(self.b_up))  # [m, h]
        if self.w_gate is None:
            hidden = self.act(hidden)
        else:
            hidden = self.act(F.linear(x, self.w_gate[i], part(self.b_gate))) * hidden
        if self.norm_weight is not None:
            norm = (self.norm_weight[i], self.norm_bias[i], self.hidden_norm_eps)
            hidden = F.layer_norm(hidden, hidden.shape[-1:], *norm)
        return F.linear(hidden, self.w_down[i], part(self.b_down))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None):
        """``indices``, ``weights`` ``[t, k]``: each token's experts and their weights; ``mask`` ``[t, k]``: which of
        those run (None: all)."""
        chosen = indices if mask is None else indices.masked_fill(~mask, -1)  # -1: named but not run
        y = torch.zeros_like(x)  # [t, d]
        for i in chosen.unique().tolist():  # each expert on the tokens that chose it
            if i < 0:
                continue
            token, choice = torch.where(chosen == i)
            out = self.expert(i, x[token])
            y = y.index_add(0, token, out * weights[token, choice].unsqueeze(-1).to(out.dtype))
        return y if self.shared_bias is None else y + self.shared_bias


class SharedExpert(nn.Module):
    def __init__(self, d_model: int, d_hidden: int, activation: str, gated: bool, bias: bool):
        super().__init__()
        self.act = ACTIVATIONS[activation]
        self.up = nn.Linear(d_model, d_hidden, bias=bias)
        self.gate = nn.Linear(d_model, d_hidden, bias=bias) if gated else None
        self.down = nn.Linear(d_hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            return self.down(self.act(self.up(x)))
        return self.down(self.act(self.gate(x)) * self.up(x))


class MoE(nn.Module):
    def __init__(self, spec: dict):
        super().__init__()
        router = spec["router"]
        self.router, self.experts = ROUTERS[router["name"]](**router), Experts(**spec["experts"])
        shared = spec.get("shared_expert")
        self.shared_expert = SharedExpert(**shared) if shared else None
        d = self.experts.w_up.shape[-1]
        self.shared_expert_gate = nn.Linear(d, 1, bias=False) if spec.get("shared_expert_gate") else None
        for name, buffer in spec.get("buffers", {}).items():  # provenance upcycle keeps (which dense units, ...)
            self.register_buffer(name, torch.zeros(buffer["shape"], dtype=getattr(torch, buffer["dtype"])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., d] -> [..., d]
        tokens = x.reshape(-1, x.shape[-1])  # [t, d]
        y = self.experts(tokens, *self.router(tokens))
        if self.shared_expert is not None:
            shared = self.shared_expert(tokens)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(tokens)) * shared
            y = y + shared
        return y.reshape(x.shape)


class MoEFFN(nn.Module):
    """What upcycle installs in place of an FFN module: the MoE and the FFN module's output dropout."""

    def __init__(self, spec: dict, dropout: float):
        super().__init__()
        self.moe, self.dropout = MoE(spec), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.moe(x))


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@functools.cache
def moe_class(dense_class_name: str) -> type:
    """The dense family's class with MoE layers where the config says: a subclass, so every class attribute
    (base-model prefix, tied weights, generation support) stays the family's."""
    dense_class = getattr(transformers, dense_class_name)

    def __init__(self, config, *args, **kwargs):
        dense_class.__init__(self, config, *args, **kwargs)
        for name, layer in config.upcycle_moe["layers"].items():
            set_submodule(self, name, MoEFFN(layer["moe"], layer["dropout"]))
        for name in config.upcycle_moe["identity"]:  # the part of a split FFN that the MoE took over
            set_submodule(self, name, nn.Identity())

    namespace = {"__init__": __init__, "config_class": UpcycleMoEConfig}
    return type(f"UpcycleMoE{dense_class_name}", (dense_class,), namespace)


class UpcycleMoEModel(transformers.PreTrainedModel):
    """The class ``auto_map`` names: loading builds :func:`moe_class` of the config's dense class instead."""

    config_class = UpcycleMoEConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        kwargs.pop("trust_remote_code", None)  # already granted: this file is the remote code
        if not isinstance(config, UpcycleMoEConfig):
            config = UpcycleMoEConfig.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return moe_class(config.dense_class).from_pretrained(pretrained_model_name_or_path, *args, config=config,
                                                             **kwargs)  # fmt: skip

    @classmethod
    def _from_config(cls, config, **kwargs):
        return moe_class(config.dense_class)._from_config(config, **kwargs)
