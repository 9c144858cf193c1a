"""SpheroMoE slot router (MoE Jetpack, Zhu et al., arXiv 2406.04801, §3.2 and Alg. 1): Soft MoE routing on the unit
sphere with learnable temperatures.

Slot queries Φ [S, d] (S = e·s, orthogonal init) pass through a LayerNorm and are L2-normalised; keys are the
tokens X (optionally through a learnable projection: the paper's Alg. 1 has one, the released code has none),
L2-normalised with ``key_norm`` (released code; the paper's text keeps their scale). Logits L = K Qᵀ are cosine
similarities in [-1, 1], so the temperatures alone set how peaked routing is:

    dispatch D = softmax over the n tokens of L / τ_d      (each slot is a convex mix of its example's tokens)
    combine  C = softmax (or entmax-1.5) over the S slots of L / τ_c   (each token mixes the slot outputs)

``temperatures="two"`` learns τ_d and τ_c apart (released code, both initialised at 0.5), ``"one"`` shares one.
Temperatures are stored as log τ so they stay positive. Optional Gaussian noise of std ``noise_std``: on the cosines
L before the temperatures (``noise_on="cosines"``), or one draw added to both L / τ_d and L / τ_c after them
(``"logits"``, the released ``DualPathSoftMoELayerWrapper``); in training only, or in evaluation too with
``noise_in_eval`` (the released code never switches it off).
``router_logits`` in the returned :class:`Routing` are the combine logits L / τ_c (what the combine read).
Dimension letters: b examples, n tokens per example, d model width, S = e·s slots.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...layers.entmax import entmax15
from ...layers.routers.base import Router, register_router
from ...layers.routing import Routing


@register_router("sphero")
class SpheroMoERouter(Router):
    kind = "slots"

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        slots_per_expert: int = 1,
        key_projection: bool = False,
        key_norm: bool = True,
        temperatures: str = "two",
        temperature_init: float = 0.5,
        noise_std: float = 0.0,
        combine: str = "softmax",
        noise_on: str = "cosines",
        noise_in_eval: bool = False,
    ):
        super().__init__(d_model, num_experts)
        if slots_per_expert < 1:
            raise ValueError(f"slots_per_expert must be >= 1, got {slots_per_expert}")
        if temperatures not in ("one", "two"):
            raise ValueError(f"temperatures must be 'one' (shared) or 'two' (dispatch, combine), got {temperatures!r}")
        if temperature_init <= 0:
            raise ValueError(f"temperature_init must be > 0, got {temperature_init}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        if combine not in ("softmax", "entmax15"):
            raise ValueError(f"combine must be 'softmax' or 'entmax15', got {combine!r}")
        if noise_on not in ("cosines", "logits"):
            raise ValueError(f"noise_on must be 'cosines' or 'logits', got {noise_on!r}")
        self.slots_per_expert, self.key_norm = slots_per_expert, key_norm
        self.noise_std, self.combine = noise_std, combine
        self.noise_on, self.noise_in_eval = noise_on, noise_in_eval
        self.slot_queries = nn.Parameter(nn.init.orthogonal_(torch.empty(num_experts * slots_per_expert, d_model)))
        self.query_norm = nn.LayerNorm(d_model)
        # identity init: the projected keys start as the released code's (projection-free) keys and learn from there
        self.key_projection = nn.Linear(d_model, d_model, bias=False) if key_projection else None
        if self.key_projection is not None:
            nn.init.eye_(self.key_projection.weight)
        # [1] shared or [2] = (dispatch, combine); log τ keeps τ = exp(·) positive whatever the optimiser does
        count = 1 if temperatures == "one" else 2
        self.log_temperature = nn.Parameter(torch.full((count,), math.log(temperature_init)))
        self._spec = {
            "d_model": d_model, "num_experts": num_experts, "slots_per_expert": slots_per_expert,
            "key_projection": key_projection, "key_norm": key_norm, "temperatures": temperatures,
            "temperature_init": temperature_init, "noise_std": noise_std, "combine": combine,
            "noise_on": noise_on, "noise_in_eval": noise_in_eval,
        }  # fmt: skip

    def temperatures(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(τ_d, τ_c) as scalars; the same tensor twice when shared."""
        tau = self.log_temperature.exp()
        return tau[0], tau[-1]

    @torch.no_grad()
    def initialize(self, generator: torch.Generator, std: float | None = None) -> None:
        """Orthogonal slot queries, as the constructor draws them, but from ``generator`` (``std`` does not apply)."""
        nn.init.orthogonal_(self.slot_queries, generator=generator)

    def forward(self, x: torch.Tensor) -> Routing:  # x [b, n, d]
        keys = x if self.key_projection is None else self.key_projection(x)
        if self.key_norm:
            keys = F.normalize(keys, dim=-1)
        queries = F.normalize(self.query_norm(self.slot_queries), dim=-1)  # [S, d]
        logits = torch.einsum("bnd,Sd->bnS", keys, queries.to(keys.dtype)).float()  # [b, n, S]
        noise = None
        if self.noise_std and (self.training or self.noise_in_eval):
            noise = self.noise_std * torch.randn_like(logits)
        if noise is not None and self.noise_on == "cosines":
            # before the temperature, so the noise keeps its size relative to the [-1, 1] range of the cosines
            logits = logits + noise
        tau_dispatch, tau_combine = self.temperatures()
        dispatch_logits, combine_logits = logits / tau_dispatch, logits / tau_combine
        if noise is not None and self.noise_on == "logits":  # the released code: one draw on both, after τ
            dispatch_logits, combine_logits = dispatch_logits + noise, combine_logits + noise
        dispatch = torch.softmax(dispatch_logits, dim=1)  # over tokens
        combine = torch.softmax(combine_logits, dim=2) if self.combine == "softmax" else entmax15(combine_logits, 2)
        return Routing(
            self.num_experts,
            dispatch=dispatch,
            combine=combine,
            slots_per_expert=self.slots_per_expert,
            router_logits=combine_logits,
        )

    def extra_repr(self) -> str:
        options = {key: value for key, value in self._spec.items() if key not in ("d_model", "num_experts")}
        return ", ".join(f"{key}={value}" for key, value in {"experts": self.num_experts, **options}.items())
