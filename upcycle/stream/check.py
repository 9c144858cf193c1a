"""The equivalence check of a streaming conversion: every converted layer against the dense FFN it replaces.

Sparse upcycling's claim (Komatsuzaki et al., arXiv 2212.05055): with experts that copy the dense FFN and
renormalised top-k weights, an MoE layer computes what the FFN computed, whatever the router chooses. A model in
memory shows it end to end (``upcycle verify``); a streamed one is never whole in memory, so each layer is checked
on its own, on random tokens ``x [t, d]``, relative to the dense output's size (as ``verify``'s per-layer check):

* the MoE block under its own router: max |moe(x) - ffn(x)| / max |ffn(x)|;
* each expert alone, when the experts are as wide as the FFN (copies): a router that starts uniform sends every
  token to the first k experts, so a broken copy among the others would pass the block check and surface only in
  training. Narrower experts (granular shards, neuron splits) are parts of the FFN, checked through the router only;
* for a merge (BTX, BAM): expert j against input model j's FFN (the block mixes different FFNs: nothing to match).

Computed in float32 whatever the stored dtype. Above ``rtol`` the conversion stops and nothing is written.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..adapters.dense_ffn import DenseFFN
from ..layers import MoE

CHECK_TOKENS = 16  # a wrong weight shows on any token; more tokens only cost time (E x the FFN each)
DEFAULT_RTOL = 1e-4  # float32 copies give ~1e-7; a wrong expert gives ~1
TINY = torch.finfo(torch.float32).tiny  # floor of the scale: an all-zero dense output must stay zero

Block = Callable[[torch.Tensor], torch.Tensor]  # [t, d] -> [t, d]
PerExpert = Callable[[torch.Tensor], torch.Tensor]  # [t, d] -> [e, t, d]: every expert on every token


@dataclass(frozen=True)
class Probe:
    """Random tokens and what a converted layer must make of them, kept while the dense FFNs are in hand, so
    checking the written layer later needs no second read of the source."""

    x: torch.Tensor  # [t, d]
    block: torch.Tensor | None  # [t, d]: the MoE block's output; None for a mixture of different FFNs (a merge)
    experts: torch.Tensor | None  # [e, t, d]: each expert's alone; None when the experts are parts of the FFN


class EquivalenceCheck:
    """Collects each converted layer's worst relative difference; raises at the first layer above ``rtol``."""

    def __init__(self, rtol: float = DEFAULT_RTOL, seed: int = 0):
        self.rtol = rtol
        self.generator = torch.Generator().manual_seed(seed)
        self.per_layer: dict[str, float] = {}

    @torch.no_grad()
    def probe(self, dense: DenseFFN, num_experts: int, copies: bool) -> Probe:
        """An upcycled layer's probe: the block and, for ``copies`` (experts as wide as the FFN), every expert alone
        must compute the dense FFN."""
        dense = float32(dense)
        x = torch.randn(CHECK_TOKENS, dense.d_model, generator=self.generator)  # [t, d]
        reference = dense.forward(x)  # [t, d]
        return Probe(x, reference, reference.expand(num_experts, *reference.shape) if copies else None)

    @torch.no_grad()
    def probe_mixture(self, ffns: list[DenseFFN]) -> Probe:
        """A merged layer's probe (BTX, BAM): expert j must compute input model j's FFN."""
        x = torch.randn(CHECK_TOKENS, ffns[0].d_model, generator=self.generator)  # [t, d]
        return Probe(x, None, torch.stack([float32(ffn).forward(x) for ffn in ffns]))  # [e, t, d]

    @torch.no_grad()
    def compare(self, name: str, probe: Probe, block: Block, experts: PerExpert) -> float:
        """Layer ``name``'s block and experts against ``probe``; raises above ``rtol``."""
        differences = {}
        if probe.block is not None:
            differences["the MoE block"] = relative(block(probe.x), probe.block)
        if probe.experts is not None:
            for j, (out, reference) in enumerate(zip(experts(probe.x), probe.experts, strict=True)):  # [t, d] each
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


def check_moe(check: EquivalenceCheck, name: str, moe: MoE, probe: Probe) -> None:
    """An upcycle MoE layer against its probe (float32 whatever its dtype)."""
    moe = moe if moe.experts.w_up.dtype == torch.float32 else copy.deepcopy(moe).float()
    experts = moe.experts

    def each_expert(x: torch.Tensor) -> torch.Tensor:  # [t, d] -> [e, t, d]
        return experts.forward_stacked(x.expand(experts.num_experts, *x.shape))

    check.compare(name, probe, moe, each_expert)


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
