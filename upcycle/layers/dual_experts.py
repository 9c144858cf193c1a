"""Dual-path experts of SpheroMoE (MoE Jetpack, Zhu et al., arXiv 2406.04801, §3.2 "adaptive dual-path MoE").

Two groups of experts behind one slot router: the first ``e_c`` experts are *core* experts (hidden width h, the
important units of the dense FFN), the remaining ``e_u`` are *universal* experts (hidden width h/4 by default:
cheap, numerous, for general features). Slot j belongs to expert ``j // s`` as everywhere, so the first ``e_c·s``
slots run through ``core`` and the rest through ``universal``:

    slots  = Dᵀ X                                [b, S, d]     (S = (e_c + e_u)·s)
    out    = concat(core(slots[:, :e_c·s]), universal(slots[:, e_c·s:]))
    Y      = C · out                             [b, n, d]

Each group is a plain :class:`~upcycle.layers.experts.Experts` (stacked weights ``core.w_up`` ...,
``universal.w_up`` ...), so recycling methods write them the way they write any experts. Slot routing only.

Expert regularisation (identity in eval mode), ``expert_dropout = p``:
* ``"paper"``: each expert's slot outputs are zeroed with probability p, independently per example and expert,
  and the kept ones scaled by 1/(1-p) so the expectation is unchanged.
* ``"released"`` (the authors' ``MultiExpertLayer``): element-wise dropout p after the activation and again after
  the second projection of every expert (one rate for both, as the released code ties them).
``drop_path = q`` (either variant; the released ``moe_drop_path_rate``, its own rate): the whole layer output of an
example is zeroed with probability q, the kept ones scaled by 1/(1-q).
Dimension letters: b examples, n tokens per example, d model width, e experts, s slots per expert, S = e·s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .experts import Experts
from .routing import Routing

DROPOUT_VARIANTS = ("paper", "released")


class DualPathExperts(nn.Module):
    shared_bias = None  # neither path has one; present so code that reads ``Experts.shared_bias`` works unchanged

    def __init__(
        self,
        core: Experts,
        universal: Experts | None = None,
        expert_dropout: float = 0.0,
        dropout_variant: str = "paper",
        drop_path: float = 0.0,
    ):
        super().__init__()
        if universal is not None and universal.d_model != core.d_model:
            raise ValueError(f"universal experts have d_model {universal.d_model}, core experts {core.d_model}")
        if any(group is not None and group.shared_bias is not None for group in (core, universal)):
            raise ValueError("dual-path experts take no shared_bias: build core and universal with shared_bias=False")
        if not 0 <= expert_dropout < 1:
            raise ValueError(f"expert_dropout must be in [0, 1), got {expert_dropout}")
        if not 0 <= drop_path < 1:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        if dropout_variant not in DROPOUT_VARIANTS:
            raise ValueError(f"dropout_variant must be one of {DROPOUT_VARIANTS}, got {dropout_variant!r}")
        self.core, self.universal = core, universal
        self.expert_dropout, self.dropout_variant, self.drop_path = expert_dropout, dropout_variant, drop_path

    @classmethod
    def create(
        cls,
        num_core: int,
        num_universal: int,
        d_model: int,
        d_hidden: int,
        d_hidden_universal: int | None = None,
        expert_dropout: float = 0.0,
        dropout_variant: str = "paper",
        drop_path: float = 0.0,
        **expert_kwargs,
    ) -> DualPathExperts:
        """Core experts of width ``d_hidden``, universal ones of ``d_hidden_universal`` (default ``d_hidden // 4``);
        ``expert_kwargs`` (activation, gated, bias, initialize, ...) go to both :class:`Experts`."""
        hidden_universal = d_hidden // 4 if d_hidden_universal is None else d_hidden_universal
        core = Experts(num_core, d_model, d_hidden, **expert_kwargs)
        universal = Experts(num_universal, d_model, hidden_universal, **expert_kwargs) if num_universal else None
        return cls(core, universal, expert_dropout, dropout_variant, drop_path)

    def spec(self) -> dict:
        """Plain data that rebuilds this module's structure; ``"type"`` tells it from a plain Experts spec."""
        return {
            "type": "dual_path",
            "core": self.core.spec(),
            "universal": None if self.universal is None else self.universal.spec(),
            "expert_dropout": self.expert_dropout,
            "dropout_variant": self.dropout_variant,
            "drop_path": self.drop_path,
        }

    @classmethod
    def from_spec(cls, spec: dict) -> DualPathExperts:
        universal = None if spec["universal"] is None else Experts.from_spec(spec["universal"])
        return cls(Experts.from_spec(spec["core"]), universal, spec["expert_dropout"], spec["dropout_variant"],
                   spec.get("drop_path", 0.0))  # fmt: skip

    # ---- the Experts surface the MoE layer and the tools use -----------------------------------------------------
    def groups(self) -> list[Experts]:
        """The expert groups in slot order: core, then universal (if any)."""
        return [self.core] if self.universal is None else [self.core, self.universal]

    @property
    def num_core(self) -> int:
        return self.core.num_experts

    @property
    def num_universal(self) -> int:
        return 0 if self.universal is None else self.universal.num_experts

    @property
    def num_experts(self) -> int:
        return self.num_core + self.num_universal

    @property
    def d_model(self) -> int:
        return self.core.d_model

    @property
    def backend(self) -> str:
        return self.core.backend  # sparse-routing backends; unused by slot routing, kept for the common switch

    @backend.setter
    def backend(self, name: str) -> None:
        for group in self.groups():
            group.backend = name

    # ---- compute ----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """``x [b, n, d]`` with dense (slot) routing -> ``[b, n, d]``."""
        if routing.is_sparse:
            raise ValueError(
                "DualPathExperts runs slot routing only (dispatch/combine), got sparse top-k routing: "
                "pair it with a slot router such as 'sphero' or 'soft'"
            )
        s, slots_total = routing.slots_per_expert, routing.dispatch.shape[-1]
        if routing.num_experts != self.num_experts or slots_total != self.num_experts * s:
            raise ValueError(
                f"routing has {routing.num_experts} experts and {slots_total} slots ({s} per expert); these "
                f"dual-path experts hold {self.num_core} core + {self.num_universal} universal experts"
            )
        if x.shape[-1] != self.d_model:
            raise ValueError(f"experts expect inputs with last dim {self.d_model}, got {tuple(x.shape)}")
        dropping = self.training and self.expert_dropout > 0
        inside = dropping and self.dropout_variant == "released"  # dropout inside the experts
        hidden_dropout = self.expert_dropout if inside else 0.0

        slots = torch.einsum("bnS,bnd->bSd", routing.dispatch.to(x.dtype), x)  # [b, S, d]
        split = self.num_core * s  # core slots come first
        out = self.core.forward_slots(slots[:, :split], s, hidden_dropout)  # [b, e_c*s, d]
        if self.universal is not None:
            universal = self.universal.forward_slots(slots[:, split:], s, hidden_dropout)  # [b, e_u*s, d]
            out = torch.cat([out, universal], dim=1)  # [b, S, d]
        if inside:  # after the second projection too, at the same rate
            out = F.dropout(out, self.expert_dropout)
        if dropping and self.dropout_variant == "paper":
            b, _, d = out.shape
            keep = self._keep_mask((b, self.num_experts, 1, 1), out)  # one draw per (example, expert)
            out = (out.reshape(b, self.num_experts, s, d) * keep).reshape(b, -1, d)
        y = torch.einsum("bnS,bSd->bnd", routing.combine.to(out.dtype), out)  # [b, n, d]
        if self.training and self.drop_path > 0:
            y = y * self._keep_mask((y.shape[0], 1, 1), y, self.drop_path)  # drop-path: one draw per example
        return y

    def _keep_mask(self, shape: tuple[int, ...], like: torch.Tensor, p: float | None = None) -> torch.Tensor:
        """0 with probability p (default ``expert_dropout``), else 1/(1-p): the expectation is unchanged."""
        keep = 1 - (self.expert_dropout if p is None else p)
        return like.new_empty(shape).bernoulli_(keep) / keep

    def extra_repr(self) -> str:
        return (
            f"core={self.num_core}x{self.core.d_hidden}, universal={self.num_universal}x"
            f"{0 if self.universal is None else self.universal.d_hidden}, expert_dropout={self.expert_dropout}, "
            f"dropout_variant={self.dropout_variant!r}, drop_path={self.drop_path}"
        )
