"""Cohere2-MoE export: a converted Cohere2 (parallel blocks, LayerNorm, interleaved RoPE on sliding layers only,
logit scale) loads with from_pretrained as Cohere2MoeForCausalLM and reproduces our logits and cached greedy
continuation, with dense layers under full attention, ungated shared experts, attention biases and tied embeddings;
raw top-k (the twin's softmax over the top-k logits always sums to 1), shared experts it cannot hold, other families
sent to it and Cohere2 sources sent to the other MoE formats are refused before anything is written."""

import json
import re

import pytest

import upcycle
from upcycle.export import chosen_format
from upcycle.export.cohere2_moe import export_cohere2_moe

from .helpers import (
    HIDDEN,
    add_shared_expert,
    assert_provenance,
    assert_refused,
    assert_round_trip,
    converted,
    tensor_names,
    tiny_llama,
    with_router_bias,
)
from .twin_sources import COHERE2_LAYERS, tiny_cohere2

NAMES = ("Cohere2-MoE", "'cohere2_moe'")  # the exporter's and the format registry's spelling


def read_config(directory) -> dict:
    return json.loads((directory / "config.json").read_text())


def test_full_conversion(tmp_path):
    model = converted(tiny_cohere2())
    out = export_cohere2_moe(model, tmp_path / "cohere2")
    assert_round_trip(model, out, "Cohere2MoeForCausalLM")
    config = read_config(out)
    assert (config["num_experts"], config["num_experts_per_tok"], config["intermediate_size"]) == (4, 2, 64)
    assert (config["layer_types"], config["sliding_window"]) == (COHERE2_LAYERS["layer_types"], 4)
    assert (config["logit_scale"], config["rms_norm_eps"], config["num_shared_experts"]) == (0.5, None, 0)
    assert config["mlp_layer_types"] == ["sparse"] * 3
    assert "model.layers.2.mlp.experts.3.down_proj.weight" in tensor_names(out)
    assert assert_provenance(model, out, "cohere2_moe")["source"]["model_type"] == "cohere2"


def test_a_dense_layer_under_full_attention_stays_without_rope(tmp_path):
    """Layer 1 attends fully: Cohere2 gives it no RoPE, and neither may the export's dense layer (force_rope)."""
    model = converted(tiny_cohere2(), layers=[0, 2])
    out = export_cohere2_moe(model, tmp_path / "cohere2")
    config = read_config(out)
    assert config["mlp_layer_types"] == ["sparse", "dense", "sparse"] and config["prefix_dense_intermediate_size"] == 64
    assert "model.layers.1.mlp.down_proj.weight" in tensor_names(out)
    assert_round_trip(model, out, "Cohere2MoeForCausalLM")


@pytest.mark.parametrize("top_k", [1, 3])
def test_top_k_is_exported(top_k, tmp_path):
    model = converted(tiny_cohere2(), top_k=top_k)
    out = export_cohere2_moe(model, tmp_path / "cohere2")
    assert read_config(out)["num_experts_per_tok"] == top_k
    assert_round_trip(model, out, "Cohere2MoeForCausalLM")


def test_attention_biases_and_untied_embeddings(tmp_path):
    model = converted(tiny_cohere2(attention_bias=True, tie_word_embeddings=False))
    out = export_cohere2_moe(model, tmp_path / "cohere2")
    assert (read_config(out)["attention_bias"], read_config(out)["tie_word_embeddings"]) == (True, False)
    assert_round_trip(model, out, "Cohere2MoeForCausalLM")


def test_ungated_shared_experts_two_experts_wide(tmp_path):
    model = add_shared_expert(converted(tiny_cohere2()), width=2 * HIDDEN, gate=False)
    model.model.layers[1].mlp.moe.shared_expert = None  # written as a zero shared MLP
    out = export_cohere2_moe(model, tmp_path / "cohere2")
    config = read_config(out)
    assert (config["num_shared_experts"], config["shared_expert_combination_strategy"]) == (2, "sum")
    assert_round_trip(model, out, "Cohere2MoeForCausalLM")


def test_auto_picks_cohere2_moe_for_a_cohere2_source(tmp_path):
    upcycle.export(converted(tiny_cohere2()), tmp_path / "auto", format="auto")
    assert chosen_format(tmp_path / "auto") == "cohere2_moe"


# ---- refusals -----------------------------------------------------------------------------------------------------
COHERE2_REFUSALS = {
    "llama source": (lambda: converted(tiny_llama()), re.escape("model_type 'llama'); 'cohere2_moe' needs a")),
    "raw top-k": (lambda: converted(tiny_cohere2(), router_renormalize=False), "softmax over the top-k logits alone"),
    "gated shared expert": (
        lambda: add_shared_expert(converted(tiny_cohere2()), width=HIDDEN, gate=True),
        "sigmoid gate, but Cohere2-MoE adds its shared MLP unweighted",
    ),
    "shared width": (
        lambda: add_shared_expert(converted(tiny_cohere2()), width=24, gate=False),
        r"shared expert width 24 is not a multiple of the expert width 64",
    ),
    "unit weights": (lambda: converted(tiny_cohere2(), method="neuron_split"), "unit_weights"),
    "router bias": (lambda: with_router_bias(converted(tiny_cohere2())), "router has a bias"),
    "capacity": (lambda: converted(tiny_cohere2(), router_capacity_factor=1.0), "capacity_factor=1.0"),
    "activation": (lambda: converted(tiny_cohere2(hidden_act="gelu")), "activation is 'gelu'.*hidden_act='silu'"),
}


@pytest.mark.parametrize("case", list(COHERE2_REFUSALS))
def test_refusals(case, tmp_path):
    build, match = COHERE2_REFUSALS[case]
    assert_refused(export_cohere2_moe, build(), tmp_path, match, NAMES)


@pytest.mark.parametrize("format", ["mixtral", "qwen2_moe", "qwen3_moe", "flex_olmo", "granitemoe"])
def test_other_formats_refuse_a_cohere2_source(format, tmp_path):
    """Their blocks are sequential with RMSNorms; Cohere2's are parallel with LayerNorms."""
    export = lambda model, out: upcycle.export(model, out, format=format)  # noqa: E731
    match = re.escape(f"(model_type 'cohere2'); {format!r} needs a *ForCausalLM of one of")
    assert_refused(export, converted(tiny_cohere2()), tmp_path, match, (repr(format),))
