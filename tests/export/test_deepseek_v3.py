"""DeepSeek-V3 export: a converted dense DeepSeek-V3 (MLA attention, every layer a dense MLP) with sigmoid routers
loads with from_pretrained as DeepseekV3ForCausalLM and reproduces our logits and cached greedy continuation, its
dense prefix and selection bias included; Llama sources (pointed to glm4_moe), softmax routers and dense layers after
MoE layers are refused with nothing written."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

import upcycle
from upcycle.export.deepseek_v3 import export_deepseek_v3
from upcycle.layers import moe_layers

from .helpers import SIZES, assert_provenance, assert_refused, assert_round_trip, converted, sigmoid_routed

NAMES = ("DeepSeek-V3", "'deepseek_v3'")
MLA = dict(q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)


def tiny_dense_deepseek(**overrides) -> DeepseekV3ForCausalLM:
    """Every layer dense (first_k_dense_replace = layers); MoE fields away from the export's so they must be set."""
    config = DeepseekV3Config(**{**SIZES, "num_key_value_heads": 4, **MLA, "first_k_dense_replace": 3,
                                 "n_routed_experts": 8, "num_experts_per_tok": 3, "n_group": 4, "topk_group": 2,
                                 "routed_scaling_factor": 2.5, **overrides})  # fmt: skip
    return DeepseekV3ForCausalLM(config).eval()


def read_config(directory) -> dict:
    return json.loads((directory / "config.json").read_text())


@pytest.mark.parametrize(("layers", "first_dense"), [("all", 0), ("last_half", 1)])
def test_round_trip(layers, first_dense, tmp_path):
    model = sigmoid_routed(tiny_dense_deepseek(), layers=layers)
    out = export_deepseek_v3(model, tmp_path / "ds")
    assert_round_trip(model, out, "DeepseekV3ForCausalLM")
    config = read_config(out)
    assert (config["first_k_dense_replace"], config["n_routed_experts"], config["num_experts_per_tok"]) == (
        first_dense, 4, 2,
    )  # fmt: skip
    assert (config["n_group"], config["topk_group"], config["routed_scaling_factor"]) == (1, 1, 1.0)
    assert (config["moe_intermediate_size"], config["kv_lora_rank"]) == (64, 16)
    layer = moe_layers(model)[-1][1]
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        bias = handle.get_tensor("model.layers.2.mlp.gate.e_score_correction_bias")
    torch.testing.assert_close(bias, layer.router.expert_bias)
    assert_provenance(model, out, "deepseek_v3")


def test_groups_and_scaling(tmp_path):
    options = {"num_groups": 2, "topk_groups": 1, "scaling": 2.5}
    model = sigmoid_routed(tiny_dense_deepseek(), router_options=options)
    out = export_deepseek_v3(model, tmp_path / "ds")
    assert (read_config(out)["n_group"], read_config(out)["routed_scaling_factor"]) == (2, 2.5)
    assert_round_trip(model, out, "DeepseekV3ForCausalLM")


def test_auto_picks_deepseek_v3_for_a_deepseek_source(tmp_path):
    from upcycle.export import chosen_format
    from upcycle.run import export_model

    export_model(sigmoid_routed(tiny_dense_deepseek()), tmp_path / "auto", "auto")
    assert chosen_format(tmp_path / "auto") == "deepseek_v3"


REFUSALS = {
    "llama source": (lambda: sigmoid_routed(None), "export a Llama-family source with sigmoid routers as 'glm4_moe'"),
    "softmax router": (lambda: converted(tiny_dense_deepseek()), "convert with `router.type: sigmoid`"),
    "dense after moe": (
        lambda: sigmoid_routed(tiny_dense_deepseek(), layers=[0, 1]),
        r"layers \[2\] are dense but follow an MoE layer",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals(case, tmp_path):
    build, match = REFUSALS[case]
    export = lambda model, out: upcycle.export(model, out, format="deepseek_v3")  # noqa: E731
    assert_refused(export, build(), tmp_path, match, NAMES)
