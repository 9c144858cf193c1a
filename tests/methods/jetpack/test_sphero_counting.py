"""MACs and parameters of one tiny SpheroMoE layer (dual-path experts) against hand counts."""

import pytest
import torch

from upcycle.eval import count_macs, count_parameters
from upcycle.layers import DualPathExperts, MoE
from upcycle.methods.jetpack.sphero import SpheroMoERouter

B, N, D = 3, 5, 8  # examples, tokens, width
E_CORE, E_UNIV, S_PER = 2, 3, 2  # experts per group, slots per expert
H, H_UNIV = 16, 4  # hidden widths: core, universal (h // 4, the default)
SLOTS = (E_CORE + E_UNIV) * S_PER


def layer(key_projection: bool, gated: bool = False) -> MoE:
    router = SpheroMoERouter(D, E_CORE + E_UNIV, S_PER, key_projection=key_projection, combine="entmax15")
    return MoE(router, DualPathExperts.create(E_CORE, E_UNIV, D, H, gated=gated, expert_dropout=0.5))


@pytest.mark.parametrize("key_projection", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_macs_by_hand(key_projection, gated):
    projections = 3 if gated else 2  # up (+ gate) and down, d·h each
    experts = S_PER * (E_CORE * projections * D * H + E_UNIV * projections * D * H_UNIV)  # per example
    routing = N * SLOTS * D + SLOTS * N * D + N * SLOTS * D  # logits K·Qᵀ, dispatch Dᵀ·X, combine C·Y
    routing += N * D * D if key_projection else 0  # the key projection, per token
    report = count_macs(layer(key_projection, gated), {"x": torch.randn(B, N, D)})
    assert report.breakdown["experts"] == experts
    assert report.breakdown["routers"] == routing
    assert report.total == experts + routing and report.breakdown["other"] == 0
    assert report.moe[""]["pairs"] == SLOTS  # per example


@pytest.mark.parametrize("key_projection", [False, True])
def test_parameters_by_hand(key_projection):
    core = E_CORE * (H * D + H + D * H + D)  # w_up, b_up, w_down, b_down
    universal = E_UNIV * (H_UNIV * D + H_UNIV + D * H_UNIV + D)
    router = SLOTS * D + 2 * D + 2 + (D * D if key_projection else 0)  # queries, their LayerNorm, two log τ, W_k
    counts = count_parameters(layer(key_projection))
    assert counts["experts_total"] == counts["experts_active"] == core + universal  # every token mixes every slot
    assert counts["router"] == router
    assert counts["total"] == counts["active"] == core + universal + router
    assert counts["shared"] == 0
