"""Qwen2-MoE export: full and partial conversion, unrenormalised top-k and shared experts load with from_pretrained
and reproduce our logits and greedy continuation; what Qwen2-MoE cannot express is refused before writing."""

import json
import re

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import LlamaConfig, Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

from upcycle.export.qwen2_moe import export_qwen2_moe
from upcycle.layers import FFN, moe_layers

from .helpers import (
    REFUSALS,
    SIZES,
    WIDTH,
    add_shared_expert,
    assert_provenance,
    assert_refused,
    assert_round_trip,
    converted,
    first_moe,
    tensor_dtypes,
    tensor_names,
    tiny_llama,
)

NAMES = ("Qwen2-MoE", "'qwen2_moe'")  # the exporter's and the format registry's spelling


def read_config(directory) -> dict:
    return json.loads((directory / "config.json").read_text())


def test_full_conversion(tmp_path):
    model = converted()
    out = export_qwen2_moe(model, tmp_path / "qwen")
    assert_round_trip(model, out, "Qwen2MoeForCausalLM")
    config = read_config(out)
    assert config["mlp_only_layers"] == [] and config["norm_topk_prob"] is True
    assert (config["num_experts"], config["moe_intermediate_size"], config["shared_expert_intermediate_size"]) == (
        4,
        64,
        1,
    )
    with safe_open(str(out / "model.safetensors"), "pt") as handle:  # the stand-in shared expert adds zero
        assert not handle.get_tensor("model.layers.0.mlp.shared_expert.down_proj.weight").any()
        assert handle.get_tensor("model.layers.0.mlp.shared_expert_gate.weight").eq(1).all()  # finite in llama.cpp
        assert not handle.get_tensor("model.layers.0.self_attn.q_proj.bias").any()  # Llama has no q/k/v bias
    assert_provenance(model, out, "qwen2_moe")


@pytest.mark.parametrize(("layers", "dense"), [([1], [0, 2]), ("last_half", [0])])
def test_partial_conversion(layers, dense, tmp_path):
    model = converted(layers=layers)
    out = export_qwen2_moe(model, tmp_path / "qwen")
    assert_round_trip(model, out, "Qwen2MoeForCausalLM")
    config = read_config(out)
    assert config["mlp_only_layers"] == dense and config["intermediate_size"] == 64
    assert f"model.layers.{dense[0]}.mlp.down_proj.weight" in tensor_names(out)
    assert assert_provenance(model, out, "qwen2_moe")["dense_layers"] == dense


@pytest.mark.parametrize(("top_k", "renormalize"), [(1, True), (3, False)])
def test_top_k_is_exported(top_k, renormalize, tmp_path):
    """num_experts_per_tok carries the router's k (Qwen2-MoE's default is 4)."""
    model = converted(top_k=top_k, router_renormalize=renormalize)
    out = export_qwen2_moe(model, tmp_path / "qwen")
    assert (read_config(out)["num_experts_per_tok"], read_config(out)["norm_topk_prob"]) == (top_k, renormalize)
    assert_round_trip(model, out, "Qwen2MoeForCausalLM")


def test_without_renormalisation(tmp_path):
    model = converted(router_renormalize=False)
    out = export_qwen2_moe(model, tmp_path / "qwen")
    assert read_config(out)["norm_topk_prob"] is False
    assert_round_trip(model, out, "Qwen2MoeForCausalLM")


def test_shared_expert(tmp_path):
    model = add_shared_expert(converted(layers="last_half"), width=24)
    for _, module in model.named_modules():  # random, not zero, so the shared path is really exercised
        if isinstance(module, nn.Linear) and module.out_features == 1:
            nn.init.normal_(module.weight, std=0.5)
    out = export_qwen2_moe(model, tmp_path / "qwen")
    assert read_config(out)["shared_expert_intermediate_size"] == 24
    assert_round_trip(model, out, "Qwen2MoeForCausalLM")


def test_a_shared_expert_on_some_layers_only(tmp_path):
    """Layers without a shared expert get a zero one of the same width (the config holds one width for all)."""
    model = converted()
    add_shared_expert(model, width=24)
    first_moe(model).shared_expert = first_moe(model).shared_expert_gate = None  # layer 0 has none
    out = export_qwen2_moe(model, tmp_path / "qwen")
    assert read_config(out)["shared_expert_intermediate_size"] == 24
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert not handle.get_tensor("model.layers.0.mlp.shared_expert.up_proj.weight").any()
    assert_round_trip(model, out, "Qwen2MoeForCausalLM")


def test_a_bfloat16_model_is_written_in_bfloat16_throughout(tmp_path):
    """The tensors the export adds (zero q/k/v biases, the zero shared expert) take the model's dtype too, so the
    checkpoint loads in one dtype and is no larger than it needs to be."""
    model = converted(tiny_llama().to(torch.bfloat16), layers=[0, 2])
    out = export_qwen2_moe(model, tmp_path / "qwen")
    dtypes = tensor_dtypes(out)
    assert {"model.layers.1.self_attn.k_proj.bias", "model.layers.2.mlp.shared_expert_gate.weight"} <= set(dtypes)
    assert set(dtypes.values()) == {torch.bfloat16}
    assert read_config(out)["dtype"] == "bfloat16"


def test_tied_embeddings_and_head_dim(tmp_path):
    model = converted(tiny_llama(tie_word_embeddings=True, head_dim=16), layers=[0, 2])
    out = export_qwen2_moe(model, tmp_path / "qwen")
    assert "lm_head.weight" in tensor_names(out)  # llama.cpp's Qwen2-MoE loader requires the output head
    assert_round_trip(model, out, "Qwen2MoeForCausalLM")


def test_qwen2_source_keeps_biases_and_sliding_window(tmp_path):
    config = Qwen2Config(**SIZES, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    model = converted(Qwen2ForCausalLM(config).eval(), layers=[1, 2])
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.bias.normal_()  # a real bias must be carried over
    out = export_qwen2_moe(model, tmp_path / "qwen")
    assert "sliding_attention" in config.layer_types  # shorter than the test sequences, so it matters
    assert read_config(out)["layer_types"] == config.layer_types
    assert_round_trip(model, out, "Qwen2MoeForCausalLM")


def test_overwrite(tmp_path):
    model = converted()
    out = export_qwen2_moe(model, tmp_path / "qwen")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_qwen2_moe(model, out)
    export_qwen2_moe(model, out, overwrite=True)


# ---- refusals -----------------------------------------------------------------------------------------------------
def with_shared_widths(model):
    add_shared_expert(model, width=24)
    first_moe(model).shared_expert = FFN(WIDTH, 8, "silu", gated=True, bias=False)
    return model


def with_dense_widths(model):
    """Dense layers 0 and 1 of different widths: the config has one intermediate_size for every dense MLP."""
    model.model.layers[0].mlp = LlamaMLP(LlamaConfig(**{**SIZES, "intermediate_size": 48}))
    return model


def without_expert_biases(model):
    """Bias-free experts next to biased dense MLPs: only the dense layers stand in the way."""
    for _, layer in moe_layers(model):
        layer.experts.b_up = layer.experts.b_gate = layer.experts.b_down = None
    return model


SHARED_IN_BOTH = {"unit weights", "router bias", "capacity", "soft router", "expert biases", "shared bias",
                  "hidden norm", "adapter", "activation", "plain experts"}  # fmt: skip
QWEN_REFUSALS = {
    **{case: REFUSALS[case] for case in SHARED_IN_BOTH},
    "o_proj bias": (
        lambda: converted(tiny_llama(attention_bias=True)),
        r"\['o_proj'\] have biases.*only q_proj, k_proj, v_proj",
    ),
    "ungated shared expert": (
        lambda: add_shared_expert(converted(), gate=False),
        re.escape(
            "layer 0: the shared expert is not scaled by a bias-free sigmoid gate; Qwen2-MoE always multiplies it by "
            "sigmoid(shared_expert_gate·x) (build the MoE with shared_expert_gate=True)"
        )
        + "$",
    ),
    "plain shared expert": (lambda: add_shared_expert(converted(), gated=False), r"\(plain silu, bias=False\) is not"),
    "biased shared expert": (
        lambda: add_shared_expert(converted(), bias=True),
        r"\(gated silu, bias=True\) is not a bias-free SiLU-gated",
    ),
    "gelu shared expert": (
        lambda: add_shared_expert(converted(), activation="gelu"),
        r"\(gated gelu, bias=False\) is not a bias-free SiLU-gated",
    ),
    "biased dense MLP": (
        lambda: without_expert_biases(converted(tiny_llama(mlp_bias=True), layers=[1])),
        r"dense MLP of layer 0 has biases \(mlp_bias=True\)",
    ),
    "shared widths": (lambda: with_shared_widths(converted()), "differ in shared expert width"),
    "dense widths": (
        lambda: with_dense_widths(converted(layers=[2])),
        re.escape("MoE layers differ in dense MLP width ({0: 48, 1: 64}); Qwen2-MoE's config holds one value") + "$",
    ),
}


@pytest.mark.parametrize("case", list(QWEN_REFUSALS))
def test_refusals(case, tmp_path):
    build, match = QWEN_REFUSALS[case]
    assert_refused(export_qwen2_moe, build(), tmp_path, match, NAMES)
