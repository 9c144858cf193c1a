"""CMoE, checked on tiny FFNs and models built here: the activation rates and the shared units equal a naive
per-token count, the routed groups are balanced, partition the other units and recover planted co-activation
groups, the router scores are the representative units' activations, the layer is the dense FFN with every expert
chosen (every backend, every FFN kind) and close to it (closer than the least-scored experts) with fewer, calibration
reads the train split, the model saves, loads and converts from the CLI, training moves the balancing bias, and bad
options are refused with what to change."""

import pytest
import torch

import upcycle
from tests.conversion.tiny_models import build
from tests.methods.ffn_fixtures import D, H, random_dense_ffn
from upcycle.adapters import find_adapter
from upcycle.adapters.dense_ffn import DenseFFN
from upcycle.cli import main
from upcycle.config import load_convert_config
from upcycle.layers import list_backends, moe_layers, update_expert_biases
from upcycle.methods.cmoe.carving import balanced_kmeans, hidden_activations, plan_carving
from upcycle.methods.cmoe.recycling import cmoe, prepare
from upcycle.pretrain import build_dense


def tokens(count: int = 300, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, D, generator=torch.Generator().manual_seed(seed))


def carved(dense: DenseFFN, x: torch.Tensor, num_experts: int = 6, top_k: int = 2, **options):
    config = load_convert_config(method="cmoe", num_experts=num_experts, top_k=top_k, **options)
    return cmoe(dense, config, torch.Generator().manual_seed(0), context=x)


def tiny_lm():
    return build_dense("lm_tiny", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2).eval()  # fmt: skip


def test_rates_and_shared_units_equal_a_naive_count():
    dense, x = random_dense_ffn(), tokens()
    activations = hidden_activations(dense, x)
    naive_h = torch.stack([torch.stack([
        torch.nn.functional.silu(dense.w_gate[i] @ row + dense.b_gate[i]) * (dense.w_up[i] @ row + dense.b_up[i])
        for i in range(H)]) for row in x])  # fmt: skip
    torch.testing.assert_close(activations, naive_h, rtol=1e-5, atol=1e-5)
    counts = [0] * H
    for row in naive_h.tolist():
        for i in sorted(range(H), key=lambda i: -abs(row[i]))[:5]:  # each token's K_a = 5 largest |h_i|
            counts[i] += 1
    plan = plan_carving(activations, 8, 4, k_active=5, iterations=3)
    assert plan.rates.tolist() == pytest.approx([c / len(x) for c in counts])
    naive_shared = sorted(sorted(range(H), key=lambda i: (-counts[i], i))[:8])
    assert plan.shared.tolist() == naive_shared


@pytest.mark.parametrize("assignment", ["linear", "greedy"])
def test_groups_are_balanced_and_partition_the_routed_units(assignment):
    plan = plan_carving(hidden_activations(random_dense_ffn(), tokens()), 4, 6, k_active=6, iterations=5,
                        assignment=assignment)  # fmt: skip
    assert plan.groups.shape == (6, 6)
    together = torch.cat([plan.shared, plan.groups.flatten()]).sort().values
    assert torch.equal(together, torch.arange(H))
    for group, representative in zip(plan.groups, plan.representatives, strict=True):
        assert representative in group


def test_balanced_kmeans_recovers_planted_coactivation_groups_and_linear_beats_greedy():
    g = torch.Generator().manual_seed(0)
    truth = torch.arange(24) % 3  # 3 planted groups of 8 units; the first 3 units seed one group each
    firing = torch.rand(3, 200, generator=g) < 0.3  # [groups, tokens]: when each group fires
    noise = torch.rand(24, 200, generator=g) < 0.05
    points = (firing[truth] ^ noise).float()  # [n, t] marker columns
    groups, nearest = balanced_kmeans(points, 3, iterations=10)
    assert sorted(sorted(truth[group].tolist()) for group in groups) == [[c] * 8 for c in range(3)]
    assert all(truth[n] == truth[group[0]] for n, group in zip(nearest, groups, strict=True))
    # on an unstructured problem the exact assignment is never worse than the greedy one
    cost = torch.rand(12, 3, generator=g)
    from upcycle.methods.cmoe.carving import _assign

    def total(labels):
        return cost[torch.arange(12), labels].sum()

    linear, greedy = _assign(cost, 4, "linear"), _assign(cost, 4, "greedy")
    assert torch.bincount(linear).tolist() == torch.bincount(greedy).tolist() == [4, 4, 4]
    assert total(linear) <= total(greedy) + 1e-6


@pytest.mark.parametrize("gated", [True, False])
def test_router_scores_are_the_representative_units_activations(gated):
    dense, x = random_dense_ffn(gated=gated), tokens()
    moe = carved(dense, x)
    expected = hidden_activations(dense, x)[:, moe.representative_units].abs()
    torch.testing.assert_close(moe.router.scores(x), expected, rtol=1e-5, atol=1e-5)
    routing = moe.router(x)
    torch.testing.assert_close(routing.router_logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(routing.indices, expected.topk(2, dim=-1).indices)  # the largest activations win
    assert torch.equal(routing.weights, torch.ones_like(routing.weights))  # u = 0: summed as the dense FFN sums
    normalized = carved(dense, x, router_rows="normalized").router
    assert torch.allclose(normalized.up.weight.norm(dim=-1), torch.ones(6))


@pytest.mark.parametrize("gated,biased,shared", [(True, True, 2), (False, True, 2), (True, False, 0), (False, True, 0)])
def test_every_expert_chosen_is_the_dense_ffn_under_every_backend(gated, biased, shared):
    dense, x = random_dense_ffn(gated, biased), tokens()
    routed = 6 if shared else 5  # N = 8 or 5 experts of 5 or 8 units: no remainder for the shared expert
    moe = carved(dense, x, num_experts=routed, top_k=routed, shared_experts=shared)
    assert (moe.shared_expert is None) == (shared == 0)
    assert (moe.experts.shared_bias is not None) == (shared == 0 and biased)  # b_down added once either way
    want = dense.forward(x)
    for backend in list_backends():
        moe.experts.backend = backend
        torch.testing.assert_close(moe(x), want, rtol=1e-5, atol=1e-4)


def test_fewer_experts_are_not_exact_but_closer_than_the_least_scored():
    dense, x = random_dense_ffn(), tokens(600)
    moe = carved(dense, x, num_experts=6, top_k=3, shared_experts=2)
    want = dense.forward(x)
    error = (moe(x) - want).norm()
    assert error > 1e-3 * want.norm()  # not the dense FFN any more
    worst = moe.router.scores(x).topk(3, dim=-1, largest=False).indices  # the experts the router likes least
    routing = moe.router(x)
    routing.indices = worst
    anti = moe.experts(x, routing) + moe.shared_expert(x)
    assert error < 0.9 * (anti - want).norm()


def test_calibration_reads_the_train_split_and_converted_models_verify(monkeypatch):
    from upcycle.eval import tasks

    splits, original = [], tasks.CausalLM.dataset

    def spy(self, split, *args, **kwargs):
        splits.append(split)
        return original(self, split, *args, **kwargs)

    monkeypatch.setattr(tasks.CausalLM, "dataset", spy)
    model = tiny_lm()
    adapter = find_adapter(model)
    config = load_convert_config(method="cmoe", num_experts=4, top_k=4, shared_experts=2, calibration_examples=3,
                                 calibration_seq_len=16)  # fmt: skip
    rows = prepare(model, adapter, adapter.ffn_sites(model), config)
    assert splits == ["train"] and [r.shape for r in rows] == [(48, 64), (48, 64)]
    options = {"calibration_examples": 3, "calibration_seq_len": 16, "shared_experts": 2}
    exact = upcycle.convert(model, method="cmoe", num_experts=4, top_k=4, progress=False, **options)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    assert upcycle.verify(exact, model, ids).passed(atol=1e-4, rtol=1e-4)
    sparse = upcycle.convert(model, method="cmoe", num_experts=4, top_k=1, progress=False, **options)
    assert not upcycle.verify(sparse, model, ids).passed(atol=1e-4, rtol=1e-4)


def test_training_moves_the_balancing_bias_and_the_scale_learns():
    dense, x = random_dense_ffn(), tokens()
    moe = carved(dense, x, num_experts=6, top_k=2).train()
    moe(x).square().mean().backward()
    assert update_expert_biases(moe) == 1
    assert moe.router.expert_bias.abs().sum() > 0  # loaded experts pushed down, idle ones up
    assert moe.router.scale.grad is not None and moe.router.scale.grad.abs().sum() > 0
    assert moe.to(torch.bfloat16).router.expert_bias.dtype == torch.float32  # γ-sized steps survive a bf16 model


def test_save_load_round_trip_and_cli(tmp_path):
    model = tiny_lm()
    options = {"calibration_examples": 2, "calibration_seq_len": 16, "shared_experts": 1}
    moe = upcycle.convert(model, method="cmoe", num_experts=3, top_k=1, progress=False, **options)
    moe_layers(moe)[0][1].router.expert_bias.copy_(torch.tensor([0.5, -0.5, 0.0]))  # a state only the save keeps
    upcycle.save(moe, tmp_path / "carved")
    loaded = upcycle.load(tmp_path / "carved")
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded(ids).logits, moe(ids).logits, rtol=0, atol=0)
    first = moe_layers(loaded)[0][1]
    assert first.router.spec()["name"] == "cmoe" and first.router.expert_bias.tolist() == [0.5, -0.5, 0.0]
    assert torch.equal(first.representative_units, moe_layers(moe)[0][1].representative_units)
    upcycle.save(model, tmp_path / "dense")
    argv = ["convert", str(tmp_path / "dense"), "--method", "cmoe", "--experts", "3", "--top-k", "1", "--set",
            "calibration_examples=2", "--set", "calibration_seq_len=16", "--set", "shared_experts=1", "--out",
            str(tmp_path / "cli")]  # fmt: skip
    assert main(argv) == 0
    from_cli = upcycle.load(tmp_path / "cli")
    assert [type(m.router).__name__ for _, m in moe_layers(from_cli)] == ["CMoERouter", "CMoERouter"]


def test_bad_options_are_refused_with_what_to_change():
    dense, x = random_dense_ffn(), tokens(20)
    with pytest.raises(ValueError, match="shared_experts"):
        load_convert_config(method="cmoe", shared_experts=-1)
    with pytest.raises(ValueError, match="no_such"):
        load_convert_config(method="cmoe", no_such=1)
    with pytest.raises(ValueError, match="activation_top_k"):
        carved(dense, x, activation_top_k=H + 1)
    with pytest.raises(ValueError, match="no hidden unit per expert"):
        carved(dense, x, num_experts=40, top_k=2, shared_experts=2)
    with pytest.raises(ValueError, match="router type cmoe"):
        carved(dense, x, router_type="sigmoid")
    with pytest.raises(ValueError, match="top_k"):
        load_convert_config(method="cmoe", num_experts=4, top_k=5, router_type="cmoe")
    normed = DenseFFN(w_up=dense.w_up, w_down=dense.w_down, activation="gelu",
                      hidden_norm=(torch.ones(H), torch.zeros(H), 1e-6))  # fmt: skip
    with pytest.raises(ValueError, match="LayerNorm"):
        carved(normed, x)
    vit = build("vit")
    with pytest.raises(ValueError, match="calibration"):  # an image model needs images; text is refused
        upcycle.convert(vit, method="cmoe", num_experts=2, top_k=1, calibration_data="shakespeare", progress=False)
