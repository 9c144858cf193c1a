"""Sparse upcycling's numbers, pinned: granular shards of a *biased* FFN add the down-projection bias once per
virtual group (the model stays dense-equivalent), weight scaling restores the dense output for renormalised and
unrenormalised top-k, copy noise is relative to each weight's own scale, and the recipe's router init std is the
std the routers get (convert, BTX/BAM merge, the BAM recipe)."""

import pytest
import torch

import upcycle
from tests.conversion.tiny_models import build
from upcycle.adapters.dense_ffn import DenseFFN
from upcycle.config import load_convert_config
from upcycle.layers import moe_layers
from upcycle.methods.sparse_upcycling.recycling import sparse_upcycling

D, H = 12, 16


def biased_ffn(activation: str = "gelu", gated: bool = False) -> DenseFFN:
    g = torch.Generator().manual_seed(0)

    def draw(*shape):
        return torch.randn(*shape, generator=g)

    return DenseFFN(w_up=draw(H, D), b_up=draw(H), w_down=draw(D, H) / 4, b_down=draw(D) * 3, activation=activation,
                    w_gate=draw(H, D) if gated else None, b_gate=draw(H) if gated else None)  # fmt: skip


def upcycled(dense: DenseFFN, **overrides):
    config = load_convert_config(method="sparse_upcycling", **overrides)
    return sparse_upcycling(dense, config, torch.Generator().manual_seed(1)).eval()


# ---- granular upcycling (arXiv 2410.07524) with biases ----------------------------------------------------------
@pytest.mark.parametrize("case", ["vit", "gpt2"])  # timm Mlp and GPT-2 Conv1D: both carry fc2 / c_proj biases
def test_granular_upcycling_of_a_biased_ffn_equals_dense(case):
    dense = build(case)
    moe = upcycle.convert(dense, "sparse_upcycling", num_experts=2, top_k=4, granularity=4, router_init_std=1.0,
                          progress=False)  # fmt: skip
    experts = moe_layers(moe)[0][1].experts
    assert experts.num_experts == 8 and experts.b_down is not None
    assert upcycle.verify(moe, dense) <= 1e-4


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("granularity", [2, 4])
def test_granular_shards_sum_to_the_dense_ffn(granularity, gated):
    """One virtual group (a whole copy) with weight 1 per shard reproduces the dense FFN, bias included."""
    dense = biased_ffn(gated=gated)
    moe = upcycled(dense, num_experts=2, top_k=granularity, granularity=granularity, weight_scaling="none")
    experts = moe.experts
    torch.testing.assert_close(experts.b_down.sum(0), 2 * dense.b_down)  # both copies: b_down once per group
    x = torch.randn(5, D)
    for copy in range(2):
        group = sum(experts.expert_forward(copy * granularity + g, x) for g in range(granularity))
        torch.testing.assert_close(group, dense.forward(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("renormalize", [True, False])
def test_auto_weight_scaling_keeps_a_biased_granular_layer_dense_equivalent(renormalize):
    """Renormalised: tied router rows pick whole groups, each shard weighted 1/T. Not renormalised: a uniform
    router gives every shard 1/(E·G); with top-k over all E·G shards every copy contributes (ties cannot matter)."""
    dense = biased_ffn()
    copies, shards = 2, 4
    top_k = shards if renormalize else copies * shards
    moe = upcycled(dense, num_experts=copies, top_k=top_k, granularity=shards, router_renormalize=renormalize,
                   router_init="normal" if renormalize else "zero", router_init_std=1.0)  # fmt: skip
    x = torch.randn(7, D)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense.forward(x), atol=1e-5, rtol=1e-5)


def test_paper_weight_scaling_is_exact_for_squared_relu():
    """The paper's (E·G²/T)^(1/3) on each matrix (and E·G²/T on b_down) is exact when act(c·x) = c²·act(x)."""
    dense = DenseFFN(**{**biased_ffn().__dict__, "activation": "relu2"})  # relu2(c·(Wx + b)) = c²·relu2(Wx + b)
    copies, shards = 2, 2
    moe = upcycled(dense, num_experts=copies, top_k=copies * shards, granularity=shards, router_renormalize=False,
                   router_init="zero", weight_scaling="paper")  # fmt: skip
    x = torch.randn(7, D)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense.forward(x), atol=1e-4, rtol=1e-4)


def test_without_weight_scaling_a_renormalised_granular_layer_outputs_one_g_th():
    dense = biased_ffn()
    moe = upcycled(dense, num_experts=2, top_k=4, granularity=4, router_init_std=1.0, weight_scaling="none")
    x = torch.randn(7, D)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense.forward(x) / 4, atol=1e-5, rtol=1e-5)


# ---- copy noise ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1e-3, 1.0, 100.0])
def test_copy_noise_is_relative_to_each_weights_std(scale):
    """noise_std is a fraction of each weight's own std, so it perturbs a tiny and a huge FFN alike."""
    base = biased_ffn()
    dense = DenseFFN(**{**base.__dict__, "w_up": base.w_up * scale, "w_down": base.w_down * scale})
    moe = upcycled(dense, num_experts=8, top_k=2, noise_std=0.1)
    for name, reference in (("w_up", dense.w_up), ("w_down", dense.w_down)):
        stacked = getattr(moe.experts, name)
        noise = stacked - reference.unsqueeze(0)  # [e, ...]
        relative = (noise.std() / stacked.std()).item()
        assert 0.08 < relative < 0.12, (name, scale, relative)
        assert not torch.equal(stacked[0], stacked[1])  # every copy draws its own noise
    torch.testing.assert_close(moe.experts.b_down, dense.b_down.expand(8, -1))  # biases are not perturbed


# ---- router init std ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("std", [0.02, 0.5])
def test_convert_router_init_std_is_used(std):
    moe = upcycle.convert(build("llama"), "sparse_upcycling", num_experts=8, top_k=2, router_init_std=std,
                          progress=False)  # fmt: skip
    weight = moe_layers(moe)[0][1].router.gate.weight
    assert abs(weight.std().item() / std - 1) < 0.15


def test_zero_router_init_routes_uniformly():
    moe = upcycle.convert(build("llama"), "sparse_upcycling", num_experts=4, top_k=2, router_init="zero",
                          router_init_std=0.5, progress=False)  # fmt: skip
    assert not moe_layers(moe)[0][1].router.gate.weight.any()


@pytest.mark.parametrize("method", ["btx", "bam"])
@pytest.mark.parametrize("std", [0.02, 0.5])
def test_merge_router_init_std_is_used(method, std):
    seed = build("llama").eval()
    merged = upcycle.merge([seed, seed, seed, seed], method=method, router_init_std=std)
    routers = [p for name, p in merged.named_parameters() if "router" in name and name.endswith("weight")]
    assert routers
    assert abs(torch.cat([p.flatten() for p in routers]).std().item() / std - 1) < 0.15


@pytest.mark.parametrize("variant", ["btx", "bam_expert_kv"])
def test_bam_recipe_router_init_std_reaches_the_mixture(variant):
    from upcycle.methods.bam.pipeline import merged
    from upcycle.methods.bam.recipe import load_recipe

    seed = build("llama").eval()
    recipe = load_recipe({"domains": ["shakespeare", "python_code"], "router_init_std": 0.5})
    mixture = merged(seed, {"shakespeare": seed, "python_code": seed}, recipe, variant)
    routers = [p for name, p in mixture.named_parameters() if "router" in name and name.endswith("weight")]
    assert abs(torch.cat([p.flatten() for p in routers]).std().item() / 0.5 - 1) < 0.15


def test_dense_ffn_reference_applies_the_hidden_layer_norm():
    """The reference forward normalises the hidden units over their last dim with weight, bias and eps."""
    g = torch.Generator().manual_seed(0)
    w_up, w_down = torch.randn(H, D, generator=g), torch.randn(D, H, generator=g)
    weight, bias = torch.randn(H, generator=g), torch.randn(H, generator=g)
    dense = DenseFFN(w_up=w_up, w_down=w_down, activation="relu", hidden_norm=(weight, bias, 10.0))
    x = torch.randn(2, 3, D, generator=g)
    hidden = torch.relu(x @ w_up.T)
    normed = (hidden - hidden.mean(-1, keepdim=True)) / (hidden.var(-1, unbiased=False, keepdim=True) + 10.0).sqrt()
    torch.testing.assert_close(dense.forward(x), (normed * weight + bias) @ w_down.T)


@pytest.mark.parametrize(("renormalize", "factor"), [(True, 2.0), (False, 2 * 2**2 / 3)])
def test_auto_weight_scaling_factor(renormalize, factor):
    """auto: W_down and b_down times G (renormalised) or E·G²/T (not), here E = 2, G = 2, T = 3."""
    dense = biased_ffn()
    experts = upcycled(dense, num_experts=2, top_k=3, granularity=2, router_renormalize=renormalize).experts
    torch.testing.assert_close(experts.w_down[1], dense.w_down[:, 8:] * factor)
    torch.testing.assert_close(experts.b_down[1], dense.b_down / 2 * factor)
    torch.testing.assert_close(experts.w_up[1], dense.w_up[8:])  # the other matrices are left alone


def test_the_recipe_router_takes_its_noise_and_slots_and_draws_from_the_conversion_seed():
    moe = upcycle.convert(build("llama"), "sparse_upcycling", num_experts=4, top_k=2, router_noise_std=0.25,
                          progress=False)  # fmt: skip
    assert moe_layers(moe)[0][1].router.noise_std == 0.25
    soft = upcycle.convert(build("vit"), "sparse_upcycling", num_experts=4, top_k=2, router_type="soft",
                           router_slots_per_expert=2, progress=False)  # fmt: skip
    assert moe_layers(soft)[0][1].router.slot_queries.shape[0] == 4 * 2
    dense, weights = build("llama"), []
    for global_seed in (0, 1):  # the global RNG plays no part in the router's weights
        torch.manual_seed(global_seed)
        moe = upcycle.convert(dense, "sparse_upcycling", num_experts=4, top_k=2, router_init_std=0.5, progress=False)
        weights.append(moe_layers(moe)[0][1].router.gate.weight.detach().clone())
    assert torch.equal(*weights)


def test_a_router_option_for_its_width_or_expert_count_is_refused_naming_the_settable_ones():
    """The width and the expert count come from the layer; the recipe sets the rest of the constructor's arguments."""
    from upcycle.recycling.routers import router_arguments

    assert router_arguments("topk")[0] == "top_k" and {"self", "d_model", "num_experts"}.isdisjoint(
        router_arguments("topk"))  # fmt: skip
    for option in ("d_model", "num_experts", "self"):
        with pytest.raises(ValueError, match=rf"router 'topk' takes no option {option}; its options: top_k, "):
            upcycle.convert(build("vit"), router_options={option: 8}, progress=False)


def test_experts_take_the_dense_models_dtype():
    moe = upcycle.convert(build("llama").to(torch.bfloat16), "sparse_upcycling", num_experts=4, top_k=2,
                          progress=False)  # fmt: skip
    assert {p.dtype for p in moe_layers(moe)[0][1].experts.parameters()} == {torch.bfloat16}
