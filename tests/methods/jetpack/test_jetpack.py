"""The ``moe_jetpack`` method (arXiv 2406.04801): experts sampled out of a wider predecessor's FFNs land in a
SpheroMoE dual-path layer with the paper's default sizes, carry their index sets, save and reload exactly."""

import pytest
import torch

import upcycle
from tests.methods.jetpack.helpers import jetpack, vit
from upcycle.layers import moe_layers
from upcycle.pretrain import build_dense
from upcycle.record import record_of


def test_experts_are_sampled_from_the_wider_predecessor(predecessor):
    model = vit(32)
    moe = jetpack(model, predecessor)
    ((name, layer),) = moe_layers(moe)
    assert name == "blocks.1.mlp.moe"
    assert (layer.experts.num_core, layer.experts.num_universal) == (8, 17)  # E_core ≈ n/2, E_univ ≈ n, n = 17
    core = layer.experts.core
    assert core.d_hidden == 128 and layer.experts.universal.d_hidden == 32 and core.d_model == 32
    wide = upcycle.load(predecessor).blocks[1].mlp
    units, channels = layer.core_hidden_units, layer.expert_channels  # [8, 128], [25, 32]
    assert channels.shape == (25, 32) and torch.equal(channels[0], channels[-1])  # channels=shared
    for i in (0, 7):
        expected = wide.fc1.weight[units[i]][:, channels[i]]
        assert torch.equal(core.w_up[i], expected)
        assert torch.equal(core.w_down[i], wide.fc2.weight[channels[i]][:, units[i]])
    assert len({tuple(u.tolist()) for u in units}) == 8  # experts differ
    # weights outside the MoE layers are the converted model's own
    assert torch.equal(moe.blocks[1].attn.qkv.weight, model.blocks[1].attn.qkv.weight)
    assert torch.equal(moe.blocks[0].mlp.fc1.weight, model.blocks[0].mlp.fc1.weight)


def test_round_trip_and_reproducibility(predecessor, tmp_path):
    moe = jetpack(vit(32), predecessor, channels="sampled", combine="entmax15", key_projection=True)
    x = torch.randn(3, 1, 8, 8)
    upcycle.save(moe, tmp_path / "moe")
    again = upcycle.load(tmp_path / "moe")
    assert torch.allclose(again(x), moe.eval()(x), atol=1e-6)
    assert record_of(again).convert["options"]["combine"] == "entmax15"
    same = jetpack(vit(32), predecessor, channels="sampled", combine="entmax15", key_projection=True)
    other = jetpack(vit(32), predecessor, channels="sampled", combine="entmax15", key_projection=True, seed=1)
    state, same_state, other_state = (m.state_dict() for m in (moe, same, other))
    assert all(torch.equal(state[k], same_state[k]) for k in state)
    assert not torch.equal(
        state["blocks.1.mlp.moe.core_hidden_units"], other_state["blocks.1.mlp.moe.core_hidden_units"]
    )
    channels = moe_layers(moe)[0][1].expert_channels
    assert len({tuple(c.tolist()) for c in channels}) > 1  # channels=sampled: per expert


@pytest.mark.parametrize("strategy", ["importance", "graph", "uniform", "random", "copy"])
def test_every_strategy_builds_a_working_layer(strategy, predecessor):
    model = vit(32)
    moe = jetpack(model, predecessor, strategy=strategy, core_experts=2, universal_experts=3, graph_parts=4)
    layer = moe_layers(moe)[0][1]
    assert layer.experts.num_experts == 5
    if strategy == "copy":  # sparse upcycling inside SpheroMoE: the model's own FFN, whole
        for i in range(2):
            assert torch.equal(layer.experts.core.w_up[i], model.blocks[1].mlp.fc1.weight)
    moe(torch.randn(2, 1, 8, 8)).sum().backward()
    assert layer.router.slot_queries.grad is not None


def test_self_recycling_and_soft_router():
    moe = jetpack(vit(32), slot_router="soft", expert_dropout=0.1)
    layer = moe_layers(moe)[0][1]
    assert type(layer.router).__name__ == "SoftMoERouter"
    assert layer.experts.core.d_hidden == 64  # half the model's own 128 units: whole copies would not differ
    assert not hasattr(layer, "expert_channels")


def test_convnext_stages_keep_their_own_channels(tmp_path):
    model = build_dense("convnext_t", num_classes=10)
    moe = upcycle.convert(model, "moe_jetpack", layers=[10, 11], calibration_data="digits", calibration_images=4,
                          progress=False)  # fmt: skip
    layers = moe_layers(moe)
    assert [layer.d_model for _, layer in layers] == [320, 320]
    assert moe(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_bad_input(predecessor, tmp_path):
    upcycle.save(vit(64, depth=3), tmp_path / "deeper")
    with pytest.raises(ValueError, match="predecessor has 3 FFNs but the model has 2"):
        jetpack(vit(32), tmp_path / "deeper")
    with pytest.raises(ValueError, match="core_hidden 300 is wider"):
        jetpack(vit(32), predecessor, core_hidden=300)
    with pytest.raises(ValueError, match="strategy"):
        jetpack(vit(32), predecessor, strategy="magic")
    lm = build_dense("lm_tiny", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1)  # fmt: skip
    with pytest.raises(ValueError, match="moe_jetpack recycles vision models"):
        jetpack(lm)


def test_the_strategy_decides_the_index_sets(predecessor):
    """uniform: the evenly spaced sets themselves (not, e.g., importance samples) of the predecessor's 256 units."""
    from upcycle.methods.jetpack.sampling import uniform_selection

    moe = jetpack(vit(32), predecessor, strategy="uniform", core_experts=2, universal_experts=3)
    units = moe_layers(moe)[0][1].core_hidden_units  # [2, h]
    assert torch.equal(units, uniform_selection(256, 2, units.shape[1]))


def test_router_options_reach_the_sphero_router(predecessor):
    """Every SpheroMoE switch of the recipe (and the router section's slots and noise) is the router's setting."""
    options = {"key_projection": True, "key_norm": False, "temperatures": "one", "temperature_init": 0.25,
               "combine": "entmax15", "router_slots_per_expert": 2, "router_noise_std": 0.125}  # fmt: skip
    router = moe_layers(jetpack(vit(32), predecessor, core_experts=2, universal_experts=3, **options))[0][1].router
    assert router._spec == {**router._spec, "key_projection": True, "key_norm": False, "temperatures": "one",
                            "temperature_init": 0.25, "combine": "entmax15", "slots_per_expert": 2,
                            "noise_std": 0.125}  # fmt: skip
    assert router.key_projection is not None and router.log_temperature.numel() == 1


@pytest.mark.parametrize("slot_router", ["sphero", "soft"])
def test_router_init_comes_from_the_conversion_seed(slot_router, predecessor):
    """The slot queries are drawn from the conversion's generator: the global RNG does not change them."""
    queries = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        moe = jetpack(vit(32), predecessor, slot_router=slot_router, strategy="uniform", core_experts=2,
                      universal_experts=3)  # fmt: skip
        queries.append(moe_layers(moe)[0][1].router.slot_queries.detach().clone())
    assert torch.equal(*queries)


@pytest.mark.parametrize("strategy", ["importance", "graph", "uniform", "random", "copy"])
def test_each_strategy_calls_its_sampler_with_the_recipe_and_generator(strategy, predecessor, monkeypatch):
    from upcycle.methods.jetpack import recycling as module

    calls = []
    for name in ("importance_sampling", "graph_partition_sampling", "uniform_selection", "random_sampling"):
        original = getattr(module, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append((_name, args, kwargs))
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    jetpack(vit(32), predecessor, strategy=strategy, core_experts=2, universal_experts=3, graph_parts=5,
            graph_threshold=0.5)  # fmt: skip
    samplers = {"importance": "importance_sampling", "graph": "graph_partition_sampling",
                "uniform": "uniform_selection", "random": "random_sampling", "copy": "random_sampling"}  # fmt: skip
    expected = samplers[strategy]
    assert calls and {name for name, _, _ in calls} == {expected}  # copy: only the narrower universal experts
    for name, args, kwargs in calls:
        if name != "uniform_selection":
            assert isinstance(args[3], torch.Generator)  # drawn from the conversion's seed
        if name == "graph_partition_sampling":
            assert (kwargs["parts"], kwargs["threshold"]) == (5, 0.5)


def test_the_soft_router_takes_the_recipes_slots_per_expert():
    router = moe_layers(jetpack(vit(32), slot_router="soft", router_slots_per_expert=3, core_experts=2,
                                universal_experts=1))[0][1].router  # fmt: skip
    assert type(router).__name__ == "SoftMoERouter" and router.slot_queries.shape[-2:] == (3 * 3, 32)


def test_a_one_token_model_gets_one_universal_and_one_core_expert():
    """n = 1 token per image (one patch, no class token): E_univ = n and E_core = max(1, n/2) both give 1."""
    one_token = vit(32, img_size=8, patch_size=8, class_token=False, global_pool="avg")
    layer = moe_layers(jetpack(one_token))[0][1]
    assert (layer.experts.num_core, layer.experts.num_universal) == (1, 1)


def test_refusals_in_full(tmp_path):
    upcycle.save(vit(64, depth=3), tmp_path / "deeper")
    with pytest.raises(ValueError, match=r"^the predecessor has 3 FFNs but the model has 2; layers are paired by "
                                         r"index, so give a predecessor of the same depth$"):  # fmt: skip
        jetpack(vit(32), tmp_path / "deeper")
    lm = build_dense("lm_tiny", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1)  # fmt: skip
    with pytest.raises(ValueError, match=r"^moe_jetpack recycles vision models \(it calibrates on images\); "
                                         r"hf_llama models are causal lm models: use sparse_upcycling or "
                                         r"neuron_split$"):  # fmt: skip
        jetpack(lm)
