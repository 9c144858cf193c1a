"""Every adapter: copies with renormalised top-k and the neuron split with all experts active reproduce the dense
model (<= 1e-4 in fp32); save/load round trips; layer selection picks the right FFNs."""

import pytest
import torch

import upcycle
from upcycle.adapters import find_adapter
from upcycle.config import select_layers
from upcycle.layers import moe_layers
from upcycle.record import record_of

from .tiny_models import ALL_CASES, build


@pytest.mark.parametrize("case", ALL_CASES)
def test_copies_with_renormalised_topk_equal_dense(case):
    dense = build(case)
    moe = upcycle.convert(dense, "sparse_upcycling", num_experts=4, top_k=2, router_init_std=1.0, progress=False)
    assert len(moe_layers(moe)) == len(find_adapter(dense).ffn_sites(dense))
    check = upcycle.verify(moe, dense)
    assert check.passed(atol=1e-4, rtol=1e-4), check


@pytest.mark.parametrize("case", [c for c in ALL_CASES if c != "eva02_swiglu_norm"])
def test_neuron_split_with_all_experts_equals_dense(case):
    dense = build(case)
    moe = upcycle.convert(dense, "neuron_split", num_experts=4, top_k=4, progress=False)
    check = upcycle.verify(moe, dense)
    assert check.passed(atol=1e-4, rtol=1e-4), check


def test_hidden_norm_cannot_be_split():
    with pytest.raises(ValueError, match="LayerNorm over its hidden units"):
        upcycle.convert(build("eva02_swiglu_norm"), "neuron_split", num_experts=4, top_k=4, progress=False)


@pytest.mark.parametrize("case", ["vit", "eva02_swiglu_norm", "convnext_conv", "llama", "gpt2", "bert"])
def test_save_load_round_trip(case, tmp_path):
    dense = build(case)
    moe = upcycle.convert(dense, "sparse_upcycling", num_experts=4, top_k=2, noise_std=0.05, layers="last_half",
                          progress=False)  # fmt: skip
    upcycle.save(moe, tmp_path / "out")
    loaded = upcycle.load(tmp_path / "out")
    adapter = find_adapter(dense)
    inputs = adapter.example_inputs(dense, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(adapter.outputs(loaded, inputs), adapter.outputs(moe.eval(), inputs))
    assert record_of(loaded) == record_of(moe)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors", "recipe.yaml"]


@pytest.mark.parametrize("method", ["sparse_upcycling", "neuron_split"])
def test_a_bfloat16_model_converts_to_a_bfloat16_moe_that_runs(method, tmp_path):
    """The new routers take the model's dtype, as upcycle.load rebuilds it: no float32 weight in a bfloat16 model."""
    dense = build("llama").to(torch.bfloat16).eval()
    moe = upcycle.convert(dense, method, num_experts=4, top_k=2, progress=False)
    assert {p.dtype for p in moe.parameters()} == {torch.bfloat16}
    adapter = find_adapter(dense)
    inputs = adapter.example_inputs(dense, generator=torch.Generator().manual_seed(3))
    loaded = upcycle.load(upcycle.save(moe, tmp_path / "out"))
    with torch.no_grad():
        torch.testing.assert_close(adapter.outputs(loaded, inputs), adapter.outputs(moe, inputs))


def test_saved_recipe_reproduces_the_conversion(tmp_path):
    dense = build("llama")
    moe = upcycle.convert(dense, "sparse_upcycling", num_experts=3, top_k=2, noise_std=0.1, seed=7, progress=False)
    upcycle.save(moe, tmp_path / "a")
    again = upcycle.convert(dense, config=tmp_path / "a" / "recipe.yaml", progress=False)
    for (name, a), (_, b) in zip(moe.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_granular_upcycling_equals_dense_on_a_real_layout():
    dense = build("llama")
    moe = upcycle.convert(dense, "sparse_upcycling", num_experts=2, top_k=4, granularity=4, progress=False)
    check = upcycle.verify(moe, dense)
    assert check.passed(atol=1e-4, rtol=1e-4), check
    assert moe_layers(moe)[0][1].experts.num_experts == 8


@pytest.mark.parametrize(
    "selection,expected",
    [("all", [0, 1, 2, 3, 4, 5]), ("every_other", [1, 3, 5]), ("last_half", [3, 4, 5]), ([0, 4], [0, 4])],
)
def test_layer_selection(selection, expected):
    assert select_layers(6, selection) == expected


def test_layer_selection_on_a_model():
    dense = build("gpt2")
    moe = upcycle.convert(dense, "sparse_upcycling", num_experts=2, top_k=1, layers=[0, 2], progress=False)
    assert [name for name, _ in moe_layers(moe)] == ["transformer.h.0.mlp.moe", "transformer.h.2.mlp.moe"]
    with pytest.raises(ValueError, match="do not exist: the model has 3 FFNs"):
        upcycle.convert(dense, "sparse_upcycling", num_experts=2, top_k=1, layers=[5], progress=False)


def test_convert_leaves_the_dense_model_untouched():
    dense = build("vit")
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    upcycle.convert(dense, "sparse_upcycling", num_experts=2, top_k=1, noise_std=0.1, progress=False)
    assert not moe_layers(dense)
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())


def test_unsupported_model_lists_families():
    with pytest.raises(ValueError, match=r"(?s)no adapter supports .*Sequential.*hf_llama"):
        upcycle.convert(torch.nn.Sequential(torch.nn.Linear(4, 4)), "sparse_upcycling", progress=False)


def test_soft_router_upcycling_runs():
    dense = build("vit")
    moe = upcycle.convert(dense, "sparse_upcycling", num_experts=4, router_type="soft", router_slots_per_expert=2,
                          layers="last_half", progress=False)  # fmt: skip
    out = moe(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_list_methods_carry_paper_urls():
    methods = {m["name"]: m for m in upcycle.list_methods()}
    assert methods["sparse_upcycling"]["paper"] == "https://arxiv.org/abs/2212.05055"
    assert methods["neuron_split"]["paper"].startswith("https://arxiv.org/abs/")
