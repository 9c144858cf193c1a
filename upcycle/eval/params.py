"""Parameter counts of a model with MoE layers: all of them, and the ones one token uses.

* ``experts_total``: the routed experts' parameters (every tensor of an :class:`~upcycle.layers.Experts` with an
  expert axis: projections, their biases, the hidden norm). The experts' ``shared_bias`` is added to every token
  unweighted, so it counts as shared, not routed.
* ``experts_active``: what one token reads of them. Fixed top-k router (top-k, MoEfication): k of e experts (the
  nominal k; a capacity limit can only drop pairs). Slot router (Soft MoE): every expert, since each token mixes all
  slots. Any other router (dynamic-k, thresholds, unknown): all experts unless the caller passes the measured
  average ``experts_per_token`` (e.g. from :func:`~upcycle.eval.routing_report.collect_routing_stats`).
* ``router``: router parameters (top-k gates, slot queries, router MLPs).
* ``shared``: shared experts, their sigmoid gates and the experts' shared bias: used by every token.
* ``active`` = ``total - experts_total + experts_active``: every non-routed parameter counts as used (embeddings
  included, as is the usual convention).

Tied tensors (an LM head tied to the embeddings) are counted once.
"""

from __future__ import annotations

from torch import nn

from ..layers import MoE, moe_layers


def _numel(tensors, seen: set[int]) -> int:
    """Elements of tensors not already counted (by identity, so tied weights count once)."""
    total = 0
    for tensor in tensors:
        if tensor is not None and id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel()
    return total


def active_experts(moe: MoE, measured: float | None = None) -> float:
    """Experts one token uses in this layer: k (routers with a fixed k), all (slots), or ``measured`` / all for
    anything else."""
    router = moe.router
    if router.fixed_k:
        return float(router.top_k)
    if router.kind == "slots":
        return float(router.num_experts)
    return float(router.num_experts if measured is None else measured)


def count_parameters(model: nn.Module, experts_per_token: float | dict[str, float] | None = None) -> dict[str, int]:
    """``total``, ``active``, ``experts_total``, ``experts_active``, ``router``, ``shared`` (see module docstring).

    ``experts_per_token``: measured average experts per token for layers whose router does not fix it (one number
    for all such layers, or ``{moe_layer_name: number}``); ignored for top-k and slot routers.
    """
    seen: set[int] = set()
    experts_total = experts_active = router = shared = 0.0
    for name, moe in moe_layers(model):
        experts = moe.experts
        routed = _numel((p for p in experts.parameters() if p is not experts.shared_bias), seen)
        measured = experts_per_token.get(name) if isinstance(experts_per_token, dict) else experts_per_token
        experts_total += routed
        experts_active += routed * active_experts(moe, measured) / experts.num_experts
        router += _numel(moe.router.parameters(), seen)
        shared_parts = [experts.shared_bias]
        for part in (moe.shared_expert, moe.shared_expert_gate):
            shared_parts += [] if part is None else list(part.parameters())
        shared += _numel(shared_parts, seen)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields each tied tensor once
    return {
        "total": total,
        "active": round(total - experts_total + experts_active),
        "experts_total": round(experts_total),
        "experts_active": round(experts_active),
        "router": round(router),
        "shared": round(shared),
    }
