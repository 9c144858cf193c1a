"""GLM4-MoE export: a converted Llama / Qwen2 / Qwen3 with sigmoid routers loads with from_pretrained as
Glm4MoeForCausalLM and reproduces our logits and cached greedy continuation, with the selection bias, groups, scaling,
a dense prefix and shared experts; softmax routers, dense layers after MoE layers, gated or odd-width shared experts,
sliding windows and o_proj biases are refused with nothing written."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import Qwen2Config, Qwen2ForCausalLM

import upcycle
from upcycle.export.glm4_moe import export_glm4_moe
from upcycle.layers import moe_layers

from .helpers import (
    SIZES,
    add_shared_expert,
    assert_no_training_noise,
    assert_provenance,
    assert_refused,
    assert_round_trip,
    converted,
    sigmoid_routed,
    tiny_llama,
    tiny_qwen3,
)

NAMES = ("GLM4-MoE", "'glm4_moe'")


def read_config(directory) -> dict:
    return json.loads((directory / "config.json").read_text())


def test_full_conversion_of_a_llama(tmp_path):
    model = sigmoid_routed()
    out = export_glm4_moe(model, tmp_path / "glm")
    assert_round_trip(model, out, "Glm4MoeForCausalLM")
    assert_no_training_noise(out)
    config = read_config(out)
    assert (config["n_routed_experts"], config["num_experts_per_tok"], config["first_k_dense_replace"]) == (4, 2, 0)
    assert config["rope_parameters"]["partial_rotary_factor"] == 1.0  # GLM's default 0.5 would rotate half
    assert (config["attention_bias"], config["use_qk_norm"], config["n_shared_experts"]) == (False, False, 1)
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        bias = handle.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias")
        torch.testing.assert_close(bias, moe_layers(model)[1][1].router.expert_bias)
        assert not handle.get_tensor("model.layers.1.mlp.shared_experts.down_proj.weight").any()  # zero stand-in
    assert_provenance(model, out, "glm4_moe")


def test_qwen3_norms_and_qwen2_biases(tmp_path):
    out = export_glm4_moe(model := sigmoid_routed(tiny_qwen3()), tmp_path / "qwen3")
    assert read_config(out)["use_qk_norm"] is True
    assert_round_trip(model, out, "Glm4MoeForCausalLM")
    qwen2 = Qwen2ForCausalLM(Qwen2Config(**SIZES)).eval()
    with torch.no_grad():
        qwen2.model.layers[0].self_attn.k_proj.bias.normal_()
    out = export_glm4_moe(model := sigmoid_routed(qwen2), tmp_path / "qwen2")
    assert read_config(out)["attention_bias"] is True
    assert_round_trip(model, out, "Glm4MoeForCausalLM")


def test_groups_scaling_and_raw_weights(tmp_path):
    options = {"num_groups": 2, "topk_groups": 1, "scaling": 2.5}
    model = sigmoid_routed(router_options=options, router_renormalize=False)
    out = export_glm4_moe(model, tmp_path / "glm")
    config = read_config(out)
    assert (config["n_group"], config["topk_group"], config["routed_scaling_factor"]) == (2, 1, 2.5)
    assert config["norm_topk_prob"] is False
    assert_round_trip(model, out, "Glm4MoeForCausalLM")


def test_dense_prefix_and_shared_experts(tmp_path):
    model = add_shared_expert(sigmoid_routed(layers="last_half"), width=128, gate=False)  # 2 × the expert width
    out = export_glm4_moe(model, tmp_path / "glm")
    config = read_config(out)
    assert (config["first_k_dense_replace"], config["n_shared_experts"], config["intermediate_size"]) == (1, 2, 64)
    assert_round_trip(model, out, "Glm4MoeForCausalLM")


def test_a_shared_expert_of_another_width_is_padded_with_zero_units(tmp_path):
    model = add_shared_expert(sigmoid_routed(), width=24, gate=False)  # 24 units: padded to one expert width, 64
    out = export_glm4_moe(model, tmp_path / "glm")
    assert read_config(out)["n_shared_experts"] == 1
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        down = handle.get_tensor("model.layers.0.mlp.shared_experts.down_proj.weight")  # [d, 64]
    assert torch.count_nonzero(down[:, 24:]) == 0
    assert_round_trip(model, out, "Glm4MoeForCausalLM")


def test_auto_picks_glm4_moe_for_sigmoid_routers_only(tmp_path):
    from upcycle.export import chosen_format
    from upcycle.run import export_model

    export_model(sigmoid_routed(), tmp_path / "sigmoid", "auto")
    assert chosen_format(tmp_path / "sigmoid") == "glm4_moe"
    export_model(converted(), tmp_path / "softmax", "auto")
    assert chosen_format(tmp_path / "softmax") == "mixtral"


def with_mistral_window():
    from transformers import MistralConfig, MistralForCausalLM

    return sigmoid_routed(MistralForCausalLM(MistralConfig(**SIZES, sliding_window=4)).eval())


REFUSALS = {
    "softmax router": (lambda: converted(), r"TopKRouter; .*convert with `router.type: sigmoid`"),
    "dense after moe": (lambda: sigmoid_routed(layers=[0]), r"layers \[1, 2\] are dense but follow an MoE layer"),
    "gated shared": (lambda: add_shared_expert(sigmoid_routed(), width=64), "adds its shared MLP unweighted"),
    "sliding window": (with_mistral_window, "sliding window of 4"),
    "o_proj bias": (lambda: sigmoid_routed(tiny_llama(attention_bias=True)), r"\['o_proj'\] have biases"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals(case, tmp_path):
    build, match = REFUSALS[case]
    assert_refused(export_glm4_moe, build(), tmp_path, match, NAMES)


def test_softmax_formats_refuse_a_sigmoid_router(tmp_path):
    export = lambda model, out: upcycle.export(model, out, format="mixtral")  # noqa: E731
    assert_refused(export, sigmoid_routed(), tmp_path, "SigmoidRouter, not token-choice top-k", ("Mixtral",))
