"""Sigmoid routing with aux-loss-free balancing (DeepSeek-V3, arXiv 2412.19437): choice on biased scores, weights
from unbiased ones, the bias update, group-limited routing, gradients, save/load, every backend, dense equivalence."""

import pytest
import torch

import upcycle
from upcycle.layers import build_router, list_backends, list_routers, moe_layers, update_expert_biases
from upcycle.layers.losses import sequence_balance_loss
from upcycle.layers.routers import SigmoidRouter

from ..export.helpers import tiny_llama
from .helpers import random_experts


def test_registered_and_listed():
    assert "sigmoid" in list_routers()
    assert isinstance(build_router("sigmoid", d_model=8, num_experts=4, top_k=2), SigmoidRouter)


def test_choice_uses_biased_scores_but_weights_unbiased_ones():
    """A bias that flips the choice: the chosen experts follow s + b, their weights s (renormalised)."""
    router = SigmoidRouter(4, 4, top_k=2, renormalize=False, init="zero").eval()
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4) * 3.0)
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 1.0, 1.0]))
    x = torch.tensor([[1.0, 1.0, -1.0, -1.0]])  # unbiased: experts 0, 1 best; biased: 2, 3 win
    routing = router(x)
    assert set(routing.indices[0].tolist()) == {2, 3}
    torch.testing.assert_close(routing.weights[0], torch.sigmoid(torch.tensor([-3.0, -3.0])))
    router.renormalize, router.scaling = True, 2.5
    torch.testing.assert_close(router(x).weights[0], torch.tensor([1.25, 1.25]))


def test_bias_moves_toward_balance_in_training_only():
    torch.manual_seed(0)
    router = SigmoidRouter(8, 4, top_k=1, bias_update_rate=0.01)
    with torch.no_grad():
        router.gate.weight[0] += 2.0  # expert 0 attracts most tokens
    x = torch.randn(256, 8).abs()
    load_before = torch.bincount(router.eval()(x).indices.reshape(-1), minlength=4)
    frozen = router.expert_bias.clone()
    router(x)
    assert update_expert_biases(router) == 1 and torch.equal(router.expert_bias, frozen)  # eval never counts
    router.train()
    router(x)
    assert torch.equal(router.expert_bias, frozen)  # forwards only count; the step moves the bias
    for _ in range(200):
        update_expert_biases(router)
        router(x)
    assert router.expert_bias[0] < 0 and not router.expert_bias.requires_grad
    load_after = torch.bincount(router.eval()(x).indices.reshape(-1), minlength=4)
    assert load_after.max() < 0.7 * load_before.max() and (load_after > 0).sum() > (load_before > 0).sum()
    still = SigmoidRouter(8, 4, top_k=1, bias_update_rate=0.0).train()
    still(x)
    assert update_expert_biases(still) == 0 and torch.equal(still.expert_bias, torch.zeros(4))


def test_one_bias_update_per_step_over_all_its_micro_batches():
    """Gradient accumulation: the step's micro-batches are counted together and move b by one γ, as one batch would;
    counting a forward twice (activation checkpointing recomputes it) leaves the update unchanged."""
    rate = 0.01
    router = SigmoidRouter(8, 4, top_k=1, bias_update_rate=rate).train()
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[0, 1:6] = 5.0  # unit vector i goes to expert 0 for i = 1..5, to expert 1 for i = 0
        router.gate.weight[1, 0] = 5.0
    first, second = torch.eye(8)[:3], torch.eye(8)[3:6]  # 1 token on expert 1 + 2 on expert 0; then 3 on expert 0
    router(first), router(second)
    torch.testing.assert_close(router.routed_load, torch.tensor([5.0, 1.0, 0.0, 0.0]))
    update_expert_biases(router)
    torch.testing.assert_close(router.expert_bias, rate * torch.tensor([-1.0, 1.0, 1.0, 1.0]))
    assert router.routed_load.sum() == 0  # the next step counts afresh
    twice = SigmoidRouter(8, 4, top_k=1, bias_update_rate=rate).train()
    twice.load_state_dict(router.state_dict() | {"expert_bias": torch.zeros(4)})
    for batch in (first, second, first, second):
        twice(batch)
    update_expert_biases(twice)
    torch.testing.assert_close(twice.expert_bias, router.expert_bias)
    assert "routed_load" not in router.state_dict()  # a step's count is not saved with the model


def naive_group_choice(biased, groups, topk_groups, k):
    """Per token: the groups ranked by the sum of their two best scores, then top-k among the kept experts."""
    chosen = []
    for row in biased:
        per_group = row.view(groups, -1)
        group_score = per_group.topk(2, dim=-1).values.sum(-1)
        keep = group_score.topk(topk_groups).indices.tolist()
        candidates = [j for j in range(row.numel()) if j // per_group.shape[1] in keep]
        chosen.append(set(sorted(candidates, key=lambda j: -row[j].item())[:k]))
    return chosen


def test_group_limited_routing_equals_naive_reference():
    torch.manual_seed(1)
    router = SigmoidRouter(16, 12, top_k=3, num_groups=4, topk_groups=2, init_std=1.0).eval()
    with torch.no_grad():
        router.expert_bias.normal_(std=0.1)
    x = torch.randn(40, 16)
    routing = router(x)
    biased = torch.sigmoid(x @ router.gate.weight.T) + router.expert_bias
    assert [set(row.tolist()) for row in routing.indices] == naive_group_choice(biased, 4, 2, 3)
    ungrouped = SigmoidRouter(16, 12, top_k=3, init_std=1.0).eval()
    ungrouped.load_state_dict(router.state_dict())
    assert not torch.equal(ungrouped(x).indices.sort(-1).values, routing.indices.sort(-1).values)


def test_gradients_reach_the_router_weights_and_the_aux_loss_is_one_when_uniform():
    router = SigmoidRouter(8, 4, top_k=2, init_std=1.0).train()
    routing = router(torch.randn(30, 8))
    (routing.weights.sum() + routing.aux_losses["sequence_balance"]).backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0
    uniform = torch.full((4, 4), 0.5)
    indices = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert sequence_balance_loss(uniform, indices).item() == pytest.approx(1.0)
    skewed = torch.tensor([[0, 1], [0, 1], [2, 3], [2, 3]])  # balanced over both sequences, not within each
    confident = torch.full((4, 4), 0.1).scatter_(1, skewed, 0.9)  # high scores where chosen
    assert sequence_balance_loss(confident, skewed).item() == pytest.approx(1.0)
    per_sequence = sequence_balance_loss(confident, skewed, torch.tensor([0, 0, 1, 1]))
    assert per_sequence.item() == pytest.approx(2 * 0.45 + 2 * 0.45)  # f = (2, 2, 0, 0), P = (.45, .45, .05, .05)


def test_the_moe_layer_passes_sequences():
    model = upcycle.convert(tiny_llama(), "sparse_upcycling", num_experts=4, top_k=2, router_type="sigmoid",
                            progress=False)  # fmt: skip
    layer = moe_layers(model)[0][1]
    layer.router.bias_update_rate = 0.0
    with torch.no_grad():
        layer.router.gate.weight.normal_()
    x = torch.randn(3, 5, 32)
    aux = layer.forward_with_routing(x)[1].aux_losses["sequence_balance"]
    routing = layer.router(x.reshape(-1, 32))
    per_sequence = sequence_balance_loss(routing.router_probs, routing.indices, torch.arange(3).repeat_interleave(5))
    torch.testing.assert_close(aux, per_sequence)


@pytest.mark.parametrize("backend", list_backends())
def test_every_backend_runs_sigmoid_routing(backend):
    from upcycle.layers import MoE

    torch.manual_seed(2)
    moe = MoE(SigmoidRouter(20, 5, top_k=2, init_std=1.0), random_experts(e=5, d=20, h=12)).eval()
    x = torch.randn(17, 20)
    reference = moe(x)
    moe.experts.backend = backend
    torch.testing.assert_close(moe(x), reference, atol=1e-5, rtol=1e-5)


def test_sparse_upcycling_with_sigmoid_router_is_dense_equivalent_and_saves_the_bias(tmp_path):
    dense = tiny_llama()
    moe = upcycle.convert(dense, "sparse_upcycling", num_experts=4, top_k=2, router_type="sigmoid",
                          router_init="zero", progress=False)  # fmt: skip
    router = moe_layers(moe)[0][1].router
    assert isinstance(router, SigmoidRouter) and router.top_k == 2 and router.renormalize
    assert upcycle.verify(moe, dense).passed(atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        router.gate.weight.normal_()
    upcycle.save(moe, tmp_path / "m")
    loaded = upcycle.load(tmp_path / "m")
    again = moe_layers(loaded)[0][1].router
    assert again.spec() == router.spec()
    torch.testing.assert_close(again.expert_bias, router.expert_bias)
    ids = torch.randint(0, 100, (2, 9))
    torch.testing.assert_close(loaded(ids).logits, moe(ids).logits)


def test_bias_stays_fp32_in_a_bfloat16_model():
    router = SigmoidRouter(8, 4).to(torch.bfloat16)
    assert router.gate.weight.dtype == torch.bfloat16 and router.expert_bias.dtype == torch.float32
    router.train()(torch.randn(10, 8, dtype=torch.bfloat16))
    update_expert_biases(router)
    assert router.expert_bias.abs().max() == pytest.approx(0.001)
