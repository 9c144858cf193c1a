"""The record a router hands to the experts.

Routers decide, experts compute: a router returns a :class:`Routing` and the experts execute it without knowing
which router made it. Two forms exist.

* **Sparse** (token choice: top-k, noisy top-k, capacity-limited top-k; dynamic-k): every token names up to ``k``
  experts. ``indices[t, j]`` is the j-th expert of token t and ``weights[t, j]`` its combine weight. ``mask``
  switches pairs off (dropped by a capacity limit, or not selected by a dynamic-k threshold); a pair with
  ``mask == False`` is never executed.
* **Dense** (slot routers: Soft MoE, SpheroMoE; arXiv 2308.00951): ``dispatch[b, n, S]`` mixes the n tokens of each
  example into ``S = e * s`` slots (softmax over tokens), ``combine[b, n, S]`` mixes the slot outputs back into
  tokens (softmax over slots). Slot ``j`` belongs to expert ``j // s``.

Dimension letters: ``t`` tokens (all leading dims flattened), ``b`` examples, ``n`` tokens per example, ``d`` model
width, ``e`` experts, ``k`` experts per token, ``s`` slots per expert, ``S`` = e·s slots.

Aux losses travel in ``aux_losses`` *unweighted*; the training loop owns the coefficients. Routers leave them out
when autograd is off (inference): nothing reads them there, and at one decoded token their dozen small ops per
layer cost about as much as the routing itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Routing:
    num_experts: int
    # sparse form
    indices: torch.Tensor | None = None  # [t, k] long: expert of each (token, choice)
    weights: torch.Tensor | None = None  # [t, k] float: combine weight of each pair
    mask: torch.Tensor | None = None  # [t, k] bool: pair executed? None = all executed
    # dense form
    dispatch: torch.Tensor | None = None  # [b, n, S] softmax over n
    combine: torch.Tensor | None = None  # [b, n, S] softmax over S
    slots_per_expert: int = 1
    # what the router saw, for losses and statistics
    router_logits: torch.Tensor | None = None  # [t, e] (sparse) or [b, n, S] (dense)
    router_probs: torch.Tensor | None = None  # [t, e] probabilities the choice was made from (sparse)
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sparse = self.indices is not None
        dense = self.dispatch is not None
        if sparse == dense:
            raise ValueError("Routing needs exactly one form: sparse (indices, weights) or dense (dispatch, combine)")
        if sparse:
            if self.weights is None or self.weights.shape != self.indices.shape:
                raise ValueError(
                    f"sparse Routing: weights {None if self.weights is None else tuple(self.weights.shape)} must "
                    f"have the shape of indices {tuple(self.indices.shape)}"
                )
            if self.mask is not None and self.mask.shape != self.indices.shape:
                raise ValueError(f"sparse Routing: mask {tuple(self.mask.shape)} must match indices")
        elif self.combine is None or self.combine.shape != self.dispatch.shape:
            raise ValueError("dense Routing: combine must have the shape of dispatch [b, n, e*s]")

    @property
    def is_sparse(self) -> bool:
        return self.indices is not None

    @property
    def top_k(self) -> int:
        return self.indices.shape[-1] if self.is_sparse else 0

    def executed(self) -> torch.Tensor:
        """[t, k] bool: which (token, choice) pairs run."""
        if not self.is_sparse:
            raise ValueError("executed() is defined for sparse routing only")
        return torch.ones_like(self.indices, dtype=torch.bool) if self.mask is None else self.mask
