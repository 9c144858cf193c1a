"""The equivalence check of a streaming conversion: every converted layer against the dense FFN it replaces.

Sparse upcycling's claim (Komatsuzaki et al., arXiv 2212.05055): with experts that copy the dense FFN and
renormalised top-k weights, an MoE layer computes what the FFN computed, whatever the router chooses. A model in
memory shows it end to end (``upcycle verify``); a streamed one is never whole in memory, so each layer is checked
on its own, on random tokens ``x [t, d]``, relative to the dense output's size (as ``verify``'s per-layer check):

* the MoE block under its own router: max |moe(x) - ffn(x)| / max |ffn(x)|;
* each expert alone, when the experts are as wide as the FFN (copies): a router that starts uniform sends every
  token to the first k experts, so a broken copy among the others would pass the block check and surface only in
  training. Narrower experts (granular shards, neuron splits) are parts of the FFN, checked through the router only.

Computed in float32 whatever the stored dtype. Above ``rtol`` the conversion stops and nothing is written.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..adapters.dense_ffn import DenseFFN

CHECK_TOKENS = 32
DEFAULT_RTOL = 1e-4  # float32 copies give ~1e-7; a wrong expert gives ~1
TINY = torch.finfo(torch.float32).tiny  # floor of the scale: an all-zero dense output must stay zero

Block = Callable[[torch.Tensor], torch.Tensor]  # [t, d] -> [t, d]
PerExpert = Callable[[torch.Tensor], torch.Tensor]  # [t, d] -> [e, t, d]: every expert on every token


class EquivalenceCheck:
    """Collects each converted layer's worst relative difference; raises at the first layer above ``rtol``."""

    def __init__(self, rtol: float = DEFAULT_RTOL, seed: int = 0):
        self.rtol = rtol
        self.generator = torch.Generator().manual_seed(seed)
        self.per_layer: dict[str, float] = {}

    @torch.no_grad()
    def layer(self, name: str, dense: DenseFFN, block: Block, experts: PerExpert | None = None) -> float:
        """Compare layer ``name`` with ``dense``; ``experts``: each expert alone (only for copies of the FFN)."""
        dense = float32(dense)
        x = torch.randn(CHECK_TOKENS, dense.d_model, generator=self.generator)  # [t, d]
        reference = dense.forward(x)  # [t, d]
        differences = {"the MoE block": relative(block(x), reference)}
        if experts is not None:
            for j, out in enumerate(experts(x)):  # [t, d] each
                differences[f"expert {j}"] = relative(out, reference)
        part = max(differences, key=lambda key: (math.isnan(differences[key]), differences[key]))
        self.per_layer[name] = differences[part]
        if not differences[part] <= self.rtol:  # NaN fails too
            raise ValueError(
                f"{name}: {part} does not reproduce the dense FFN (max |moe - dense| / max |dense| = "
                f"{differences[part]:.3e} on random tokens, above {self.rtol:g}); nothing was written. A recipe that "
                "changes the experts on purpose (noise_std, ...) does not claim equivalence: pass check=False "
                "(upcycle convert --no-check)"
            )
        return differences[part]

    @property
    def worst(self) -> tuple[str | None, float]:
        """(layer, its relative difference) of the largest difference seen; (None, 0.0) before any layer."""
        if not self.per_layer:
            return None, 0.0
        name = max(self.per_layer, key=self.per_layer.__getitem__)
        return name, self.per_layer[name]


def relative(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.float() - reference).abs().max() / reference.abs().max().clamp_min(TINY)).item()


def float32(dense: DenseFFN) -> DenseFFN:
    if dense.w_up.dtype == torch.float32:
        return dense
    norm = dense.hidden_norm
    return DenseFFN(
        activation=dense.activation, **{name: t.float() for name, t in dense.tensors().items() if "norm" not in name},
        hidden_norm=None if norm is None else (norm[0].float(), norm[1].float(), norm[2]),
    )  # fmt: skip
