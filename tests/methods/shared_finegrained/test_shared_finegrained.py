"""Shared + fine-grained experts (DeepSeekMoE layout, upcycled as Qwen1.5-MoE), checked on tiny FFNs and models
built here: the shared expert and the routed segments partition the dense hidden units, each part holds exactly its
dense rows, the layer is the dense FFN at conversion when top-k picks whole copies (gated or ungated shared expert,
gated and plain FFNs with biases) and is not when it cannot, the options are validated, the model saves, loads and
streams, and it exports exactly to Qwen2-MoE (sigmoid-gated shared expert) and GraniteMoeShared (ungated)."""

import pytest
import torch

import upcycle
from tests.conversion.tiny_models import build
from tests.export.helpers import assert_round_trip, tiny_llama
from tests.export.twin_sources import tiny_granite
from tests.methods.ffn_fixtures import D, H, random_dense_ffn
from upcycle.adapters.dense_ffn import DenseFFN
from upcycle.cli import main
from upcycle.config import load_convert_config
from upcycle.export.granitemoe import export_granitemoeshared
from upcycle.export.qwen2_moe import export_qwen2_moe
from upcycle.layers import moe_layers
from upcycle.methods.shared_finegrained.recycling import shared_finegrained


def carved(dense: DenseFFN, num_experts: int = 8, top_k: int = 4, **options):
    config = load_convert_config(method="shared_finegrained", num_experts=num_experts, top_k=top_k,
                                 router_init_std=1.0, **options)  # fmt: skip
    return shared_finegrained(dense, config, torch.Generator().manual_seed(0))


# ---- the split ----------------------------------------------------------------------------------------------------
def test_shared_and_routed_units_partition_the_ffn_and_the_shared_are_the_largest_weight_norms():
    dense = random_dense_ffn()
    moe = carved(dense, shared_fraction=0.25)  # (40 - 10) // 4 = 7 units per segment: 12 shared, 28 routed
    shared, routed = moe.shared_hidden_units, moe.expert_hidden_units
    assert shared.numel() == 12 and routed.shape == (8, 7)
    first_copy = routed[:4].flatten()
    assert torch.equal(routed[4:], routed[:4])  # copy 2 = copy 1
    assert sorted(shared.tolist() + first_copy.tolist()) == list(range(H))
    score = dense.w_up.norm(dim=1) * dense.w_gate.norm(dim=1) * dense.w_down.norm(dim=0)
    assert score[shared].min() > score[first_copy].max()


def test_first_takes_the_leading_units():
    moe = carved(random_dense_ffn(), shared_units="first", shared_fraction=0.25)
    assert moe.shared_hidden_units.tolist() == list(range(12))


def test_each_part_holds_exactly_its_dense_rows():
    dense = random_dense_ffn()
    moe = carved(dense, shared_gate="sigmoid")
    experts, segments = moe.experts, 4
    for i, units in enumerate(moe.expert_hidden_units):
        torch.testing.assert_close(experts.w_up[i], dense.w_up[units], rtol=0, atol=0)
        torch.testing.assert_close(experts.w_gate[i], dense.w_gate[units], rtol=0, atol=0)
        torch.testing.assert_close(experts.b_up[i], dense.b_up[units], rtol=0, atol=0)
        torch.testing.assert_close(experts.w_down[i], dense.w_down[:, units] * segments)  # undoes the 1/k weights
    assert experts.b_down is None  # b_down belongs to no unit: the shared expert adds it once
    units = moe.shared_hidden_units
    shared = moe.shared_expert
    torch.testing.assert_close(shared.up.weight, dense.w_up[units], rtol=0, atol=0)
    torch.testing.assert_close(shared.down.weight, 2 * dense.w_down[:, units])  # sigmoid(0) = 1/2
    torch.testing.assert_close(shared.down.bias, 2 * dense.b_down)
    assert torch.count_nonzero(moe.shared_expert_gate.weight) == 0


# ---- dense equivalence ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("shared_gate", ["none", "sigmoid"])
@pytest.mark.parametrize("top_k", [4, 8])  # one copy, both copies
def test_the_layer_is_the_dense_ffn_when_top_k_picks_whole_copies(gated, shared_gate, top_k):
    dense = random_dense_ffn(gated=gated)
    moe = carved(dense, top_k=top_k, shared_gate=shared_gate).eval()
    x = torch.randn(64, D)
    torch.testing.assert_close(moe(x), dense.forward(x), rtol=1e-5, atol=1e-4)


def test_without_a_shared_expert_it_is_granular_upcycling():
    dense = random_dense_ffn()
    moe = carved(dense, num_experts=10, top_k=5, shared_fraction=0.0, segments=5).eval()  # 40 = 5 · 8: all routed
    assert moe.shared_expert is None and not hasattr(moe, "shared_hidden_units")
    x = torch.randn(32, D)
    torch.testing.assert_close(moe(x), dense.forward(x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_converted_models_verify_and_a_split_copy_fails_verification(family):
    dense = build(family)
    moe = upcycle.convert(dense, "shared_finegrained", num_experts=4, top_k=2, segments=2, router_init_std=1.0,
                          progress=False)  # fmt: skip
    assert upcycle.verify(moe, dense).passed()
    # top-1 over segments of 2 drops half of the routed units: verification must see it
    broken = upcycle.convert(dense, "shared_finegrained", num_experts=4, top_k=1, segments=2, router_init_std=1.0,
                             progress=False)  # fmt: skip
    assert not upcycle.verify(broken, dense).passed()


# ---- bad input ------------------------------------------------------------------------------------------------------
def test_options_are_validated():
    with pytest.raises(ValueError, match="multiple of segments=4"):
        carved(random_dense_ffn(), num_experts=6, top_k=2)
    with pytest.raises(ValueError, match="no routed unit"):
        carved(random_dense_ffn(), num_experts=64, top_k=2, segments=64)
    with pytest.raises(ValueError, match="shared_fraction"):
        load_convert_config(method="shared_finegrained", shared_fraction=1.0)
    norm = random_dense_ffn()
    norm.hidden_norm = (torch.ones(H), torch.zeros(H), 1e-6)
    with pytest.raises(ValueError, match="LayerNorm over its hidden units"):
        carved(norm)


# ---- saving, the CLI, streaming ------------------------------------------------------------------------------------
def test_cli_converts_saves_and_streams_the_same_model(tmp_path):
    build("llama").save_pretrained(tmp_path / "llama")
    common = ["--method", "shared_finegrained", "--set", "segments=2", "--experts", "4", "--top-k", "2"]
    assert main(["convert", str(tmp_path / "llama"), *common, "--out", str(tmp_path / "memory")]) == 0
    assert main(["convert", str(tmp_path / "llama"), *common, "--stream", "--out", str(tmp_path / "streamed")]) == 0
    memory, streamed = (upcycle.load(tmp_path / name) for name in ("memory", "streamed"))
    first = moe_layers(memory)[0][1]
    assert first.shared_expert is not None and first.experts.num_experts == 4
    memory, streamed = memory.state_dict(), streamed.state_dict()
    assert memory.keys() == streamed.keys()
    assert all(torch.equal(memory[name], streamed[name]) for name in memory)


# ---- exact exports --------------------------------------------------------------------------------------------------
def trained_router(model):
    """Router rows drawn apart (as training moves them), so the export must route as we do, not just copy dense."""
    with torch.no_grad():
        for _, layer in moe_layers(model):
            layer.router.gate.weight.normal_(std=1.0)
            if layer.shared_expert_gate is not None:
                layer.shared_expert_gate.weight.normal_(std=1.0)
    return model


def test_qwen2_moe_export_is_exact_with_the_sigmoid_gated_shared_expert(tmp_path):
    dense = tiny_llama()
    moe = upcycle.convert(dense, "shared_finegrained", num_experts=8, top_k=4, shared_gate="sigmoid", progress=False)
    assert upcycle.verify(moe, dense).passed()
    trained_router(moe)
    assert_round_trip(moe, export_qwen2_moe(moe.eval(), tmp_path / "qwen2_moe"), "Qwen2MoeForCausalLM")
    ungated = upcycle.convert(dense, "shared_finegrained", num_experts=8, top_k=4, progress=False)
    with pytest.raises(ValueError, match="sigmoid gate"):
        export_qwen2_moe(ungated, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_granitemoeshared_export_is_exact_with_the_ungated_shared_expert(tmp_path):
    dense = tiny_granite()
    moe = upcycle.convert(dense, "shared_finegrained", num_experts=8, top_k=4, progress=False)
    assert upcycle.verify(moe, dense).passed()
    trained_router(moe)
    directory = export_granitemoeshared(moe.eval(), tmp_path / "granite")
    assert_round_trip(moe, directory, "GraniteMoeSharedForCausalLM")


@pytest.mark.parametrize("target", ["deepseek_v3", "glm4_moe"])
def test_sigmoid_routed_conversions_are_exact_and_export_exactly_to_deepseek_v3_and_glm4_moe(target, tmp_path):
    """DeepSeek-style: an ungated shared expert beside fine-grained experts behind the sigmoid router (whole copies
    picked, weights renormalised: exact at conversion), exported with the learnt balancing bias."""
    from tests.export.test_deepseek_v3 import tiny_dense_deepseek
    from upcycle.export import export

    dense = tiny_dense_deepseek() if target == "deepseek_v3" else tiny_llama()
    moe = upcycle.convert(dense, "shared_finegrained", num_experts=8, top_k=4, router_type="sigmoid", progress=False)
    assert upcycle.verify(moe, dense).passed()
    trained_router(moe)
    with torch.no_grad():
        for _, layer in moe_layers(moe):
            layer.router.expert_bias.normal_(std=0.5)  # as aux-loss-free balancing leaves it
    expected = {"deepseek_v3": "DeepseekV3ForCausalLM", "glm4_moe": "Glm4MoeForCausalLM"}[target]
    assert_round_trip(moe, export(moe.eval(), tmp_path / target, format=target), expected)
