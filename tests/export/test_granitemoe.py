"""GraniteMoe / GraniteMoeShared export: a converted Granite (embedding, attention, residual and logit multipliers)
loads with from_pretrained as GraniteMoeForCausalLM, or GraniteMoeSharedForCausalLM with ungated shared experts,
and reproduces our logits and cached greedy continuation; raw top-k (the twins' softmax over the top-k logits
always sums to 1), dense layers, gated shared experts, other families sent to them and Granite sources sent to
the other MoE formats are refused before anything is written."""

import json
import re

import pytest
import torch
from safetensors import safe_open

import upcycle
from upcycle.export import chosen_format
from upcycle.export.granitemoe import export_granitemoe, export_granitemoeshared
from upcycle.layers import FFN

from .helpers import (
    HIDDEN,
    WIDTH,
    add_shared_expert,
    assert_provenance,
    assert_refused,
    assert_round_trip,
    converted,
    first_moe,
    tensor_names,
    tiny_llama,
    with_shared_bias,
)
from .twin_sources import MULTIPLIERS, tiny_granite

GRANITEMOE = ("GraniteMoe", "'granitemoe'")  # the exporter's and the format registry's spelling
SHARED = ("GraniteMoeShared", "'granitemoeshared'")


def read_config(directory) -> dict:
    return json.loads((directory / "config.json").read_text())


def ungated_shared(model, width: int = 24):
    return add_shared_expert(model, width=width, gate=False)


def test_full_conversion(tmp_path):
    model = converted(tiny_granite())
    out = export_granitemoe(model, tmp_path / "granite")
    assert_round_trip(model, out, "GraniteMoeForCausalLM")
    config = read_config(out)
    assert {name: config[name] for name in MULTIPLIERS} == MULTIPLIERS
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["intermediate_size"]) == (4, 2, 64)
    experts = first_moe(model).experts
    with safe_open(str(out / "model.safetensors"), "pt") as handle:  # fused, gate rows first
        fused = handle.get_tensor("model.layers.0.block_sparse_moe.input_linear.weight")
        torch.testing.assert_close(fused, torch.cat([experts.w_gate, experts.w_up], dim=1))
    assert "model.layers.2.block_sparse_moe.router.layer.weight" in tensor_names(out)
    assert assert_provenance(model, out, "granitemoe")["source"]["model_type"] == "granite"


@pytest.mark.parametrize("top_k", [1, 3])
def test_top_k_is_exported(top_k, tmp_path):
    model = converted(tiny_granite(), top_k=top_k)
    out = export_granitemoe(model, tmp_path / "granite")
    assert read_config(out)["num_experts_per_tok"] == top_k
    assert_round_trip(model, out, "GraniteMoeForCausalLM")


def test_attention_biases_and_tied_embeddings(tmp_path):
    model = converted(tiny_granite(attention_bias=True, tie_word_embeddings=True))
    out = export_granitemoe(model, tmp_path / "granite")
    assert (read_config(out)["attention_bias"], read_config(out)["tie_word_embeddings"]) == (True, True)
    assert_round_trip(model, out, "GraniteMoeForCausalLM")


def test_ungated_shared_experts(tmp_path):
    model = ungated_shared(converted(tiny_granite()))
    out = export_granitemoeshared(model, tmp_path / "shared")
    assert read_config(out)["shared_intermediate_size"] == 24
    assert_round_trip(model, out, "GraniteMoeSharedForCausalLM")


def test_a_layer_without_its_shared_expert_gets_a_zero_one(tmp_path):
    model = ungated_shared(converted(tiny_granite()))
    model.model.layers[1].mlp.moe.shared_expert = None
    out = export_granitemoeshared(model, tmp_path / "shared")
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert not handle.get_tensor("model.layers.1.shared_mlp.output_linear.weight").any()
    assert_round_trip(model, out, "GraniteMoeSharedForCausalLM")


def test_granitemoeshared_without_shared_experts_is_granitemoe(tmp_path):
    model = converted(tiny_granite())
    out = export_granitemoeshared(model, tmp_path / "shared")
    assert read_config(out)["shared_intermediate_size"] == 0
    assert_round_trip(model, out, "GraniteMoeSharedForCausalLM")


@pytest.mark.parametrize(("shared", "format"), [(False, "granitemoe"), (True, "granitemoeshared")])
def test_auto_picks_the_granite_twin(shared, format, tmp_path):
    model = converted(tiny_granite())
    upcycle.export(ungated_shared(model) if shared else model, tmp_path / "auto", format="auto")
    assert chosen_format(tmp_path / "auto") == format


# ---- refusals -----------------------------------------------------------------------------------------------------
def with_gated_shared():
    return add_shared_expert(converted(tiny_granite()), width=24, gate=True)


def with_plain_shared():
    return add_shared_expert(converted(tiny_granite()), width=24, gate=False, gated=False)


COMMON_REFUSALS = {
    "llama source": (lambda: converted(tiny_llama()), r"model_type 'llama'\); 'granitemoe(shared)?' needs a"),
    "raw top-k": (lambda: converted(tiny_granite(), router_renormalize=False), r"softmax over the top-k logits alone"),
    "partial": (lambda: converted(tiny_granite(), layers=[1]), r"layers \[0, 2\] are still dense.*layers='all'"),
    "expert biases": (lambda: converted(tiny_granite(mlp_bias=True)), r"experts have biases .*mlp_bias=True"),
    "unit weights": (lambda: converted(tiny_granite(), method="neuron_split"), "unit_weights"),
    "shared bias": (lambda: with_shared_bias(converted(tiny_granite())), "shared output bias"),
    "soft router": (lambda: converted(tiny_granite(), router_type="soft"), "SoftMoERouter, not token-choice top-k"),
}
SHARED_REFUSALS = {
    "gated shared expert": (with_gated_shared, r"sigmoid gate, but GraniteMoeShared adds its shared MLP unweighted"),
    "plain shared expert": (with_plain_shared, r"\(plain silu, bias=False\) is not a bias-free SiLU-gated MLP"),
}


@pytest.mark.parametrize("case", list(COMMON_REFUSALS))
@pytest.mark.parametrize("export", [export_granitemoe, export_granitemoeshared])
def test_refusals(export, case, tmp_path):
    build, match = COMMON_REFUSALS[case]
    assert_refused(export, build(), tmp_path, match, GRANITEMOE if export is export_granitemoe else SHARED)


@pytest.mark.parametrize("case", list(SHARED_REFUSALS))
def test_shared_expert_refusals(case, tmp_path):
    build, match = SHARED_REFUSALS[case]
    assert_refused(export_granitemoeshared, build(), tmp_path, match, SHARED)


def test_granitemoe_refuses_a_shared_expert(tmp_path):
    model = ungated_shared(converted(tiny_granite()))
    assert_refused(export_granitemoe, model, tmp_path, r"shared expert.*use 'granitemoeshared'", GRANITEMOE)


def test_shared_experts_of_different_widths_are_refused(tmp_path):
    model = ungated_shared(converted(tiny_granite()))
    first_moe(model).shared_expert = FFN(WIDTH, HIDDEN, activation="silu", gated=True, bias=False)
    assert_refused(export_granitemoeshared, model, tmp_path, "differ in shared expert width", SHARED)


@pytest.mark.parametrize("format", ["mixtral", "qwen2_moe", "qwen3_moe", "flex_olmo", "cohere2_moe"])
def test_other_formats_refuse_a_granite_source(format, tmp_path):
    """Their blocks have none of Granite's multipliers."""
    export = lambda model, out: upcycle.export(model, out, format=format)  # noqa: E731
    match = re.escape(f"(model_type 'granite'); {format!r} needs a *ForCausalLM of one of")
    assert_refused(export, converted(tiny_granite()), tmp_path, match, (repr(format),))


def test_auto_falls_back_to_the_generic_class_for_raw_top_k(tmp_path):
    upcycle.export(converted(tiny_granite(), router_renormalize=False), tmp_path / "auto", format="auto")
    assert chosen_format(tmp_path / "auto") == "hf_generic"
