"""FlexOlmo export: a converted OLMo 2 (whole-projection q/k norms, post-norms) loads with from_pretrained as
FlexOlmoForCausalLM and reproduces our logits and cached greedy continuation, renormalised or raw top-k, with
attention biases and tied embeddings; what FlexOlmo cannot express, other families sent to it, and OLMo 2 sources
sent to the other MoE formats are refused before anything is written."""

import json
import re

import pytest
import torch
from safetensors import safe_open

import upcycle
from upcycle.export.flex_olmo import export_flex_olmo

from .helpers import (
    add_shared_expert,
    assert_provenance,
    assert_refused,
    assert_round_trip,
    converted,
    tensor_names,
    tiny_llama,
    with_router_bias,
)
from .twin_sources import tiny_olmo2

NAMES = ("FlexOlmo", "'flex_olmo'")  # the exporter's and the format registry's spelling


def read_config(directory) -> dict:
    return json.loads((directory / "config.json").read_text())


def test_full_conversion(tmp_path):
    model = converted(tiny_olmo2())
    out = export_flex_olmo(model, tmp_path / "flex")
    assert_round_trip(model, out, "FlexOlmoForCausalLM")
    config = read_config(out)
    assert (config["num_experts"], config["num_experts_per_tok"], config["norm_topk_prob"]) == (4, 2, True)
    assert config["intermediate_size"] == 64 and config["model_type"] == "flex_olmo"
    with safe_open(str(out / "model.safetensors"), "pt") as handle:  # the whole-projection norms and post-norms
        for name in ("self_attn.q_norm.weight", "post_feedforward_layernorm.weight"):
            torch.testing.assert_close(handle.get_tensor(f"model.layers.1.{name}"),
                                       model.model.layers[1].get_parameter(name))  # fmt: skip
    assert "model.layers.2.mlp.experts.3.down_proj.weight" in tensor_names(out)
    assert assert_provenance(model, out, "flex_olmo")["source"]["model_type"] == "olmo2"


@pytest.mark.parametrize(("top_k", "renormalize"), [(1, True), (3, False), (2, False)])
def test_top_k_and_renormalisation_are_exported(top_k, renormalize, tmp_path):
    """FlexOlmo's defaults are k = 5 and norm_topk_prob = False: both must come from the router."""
    model = converted(tiny_olmo2(), top_k=top_k, router_renormalize=renormalize)
    out = export_flex_olmo(model, tmp_path / "flex")
    assert (read_config(out)["num_experts_per_tok"], read_config(out)["norm_topk_prob"]) == (top_k, renormalize)
    assert_round_trip(model, out, "FlexOlmoForCausalLM")


def test_attention_biases_and_tied_embeddings(tmp_path):
    model = converted(tiny_olmo2(attention_bias=True, tie_word_embeddings=True))
    out = export_flex_olmo(model, tmp_path / "flex")
    assert (read_config(out)["attention_bias"], read_config(out)["tie_word_embeddings"]) == (True, True)
    assert_round_trip(model, out, "FlexOlmoForCausalLM")


def test_auto_picks_flex_olmo_for_an_olmo2_source(tmp_path):
    from upcycle.export import chosen_format

    upcycle.export(converted(tiny_olmo2()), tmp_path / "auto", format="auto")
    assert chosen_format(tmp_path / "auto") == "flex_olmo"


# ---- refusals -----------------------------------------------------------------------------------------------------
FLEX_OLMO_REFUSALS = {
    "llama source": (lambda: converted(tiny_llama()), re.escape("model_type 'llama'); 'flex_olmo' needs a")),
    "partial": (lambda: converted(tiny_olmo2(), layers=[1]), r"layers \[0, 2\] are still dense.*layers='all'"),
    "shared expert": (lambda: add_shared_expert(converted(tiny_olmo2())), r"layers \[0, 1, 2\] have a shared"),
    "unit weights": (lambda: converted(tiny_olmo2(), method="neuron_split"), "unit_weights"),
    "router bias": (lambda: with_router_bias(converted(tiny_olmo2())), "router has a bias"),
    "capacity": (lambda: converted(tiny_olmo2(), router_capacity_factor=1.0), "capacity_factor=1.0"),
    "soft router": (lambda: converted(tiny_olmo2(), router_type="soft"), "SoftMoERouter, not token-choice top-k"),
    "activation": (lambda: converted(tiny_olmo2(hidden_act="gelu")), "activation is 'gelu'.*hidden_act='silu'"),
}


@pytest.mark.parametrize("case", list(FLEX_OLMO_REFUSALS))
def test_refusals(case, tmp_path):
    build, match = FLEX_OLMO_REFUSALS[case]
    assert_refused(export_flex_olmo, build(), tmp_path, match, NAMES)


@pytest.mark.parametrize("format", ["mixtral", "qwen2_moe", "qwen3_moe", "granitemoe", "cohere2_moe"])
def test_other_formats_refuse_an_olmo2_source(format, tmp_path):
    """Their blocks put the norms before each sub-layer (and Qwen3-MoE's q/k norms are per head)."""
    export = lambda model, out: upcycle.export(model, out, format=format)  # noqa: E731
    match = re.escape(f"(model_type 'olmo2'); {format!r} needs a *ForCausalLM of one of")
    assert_refused(export, converted(tiny_olmo2()), tmp_path, match, (repr(format),))


def test_auto_falls_back_to_the_generic_class_for_what_flex_olmo_refuses(tmp_path):
    from upcycle.export import chosen_format

    upcycle.export(converted(tiny_olmo2(), layers=[1]), tmp_path / "auto", format="auto")
    assert chosen_format(tmp_path / "auto") == "hf_generic"
