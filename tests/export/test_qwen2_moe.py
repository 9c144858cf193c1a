"""Qwen2-MoE export: full and partial conversion, unrenormalised top-k and shared experts load with from_pretrained
and reproduce our logits and greedy continuation; what Qwen2-MoE cannot express is refused before writing."""

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from upcycle.export.qwen2_moe import export_qwen2_moe
from upcycle.layers import FFN

from .helpers import (
    REFUSALS,
    SIZES,
    WIDTH,
    add_shared_expert,
    assert_refused,
    assert_round_trip,
    converted,
    first_moe,
    tensor_names,
    tiny_llama,
)


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
        assert not handle.get_tensor("model.layers.0.self_attn.q_proj.bias").any()  # Llama has no q/k/v bias


@pytest.mark.parametrize(("layers", "dense"), [([1], [0, 2]), ("last_half", [0])])
def test_partial_conversion(layers, dense, tmp_path):
    model = converted(layers=layers)
    out = export_qwen2_moe(model, tmp_path / "qwen")
    assert_round_trip(model, out, "Qwen2MoeForCausalLM")
    config = read_config(out)
    assert config["mlp_only_layers"] == dense and config["intermediate_size"] == 64
    assert f"model.layers.{dense[0]}.mlp.down_proj.weight" in tensor_names(out)


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


def test_tied_embeddings_and_head_dim(tmp_path):
    model = converted(tiny_llama(tie_word_embeddings=True, head_dim=16), layers=[0, 2])
    out = export_qwen2_moe(model, tmp_path / "qwen")
    assert "lm_head.weight" not in tensor_names(out)
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
        "not scaled by a bias-free sigmoid gate",
    ),
    "plain shared expert": (lambda: add_shared_expert(converted(), gated=False), r"\(plain silu, bias=False\) is not"),
    "biased shared expert": (
        lambda: add_shared_expert(converted(), bias=True),
        r"bias=True\) is not a bias-free SiLU-gated",
    ),
    "shared widths": (lambda: with_shared_widths(converted()), "differ in shared expert width"),
}


@pytest.mark.parametrize("case", list(QWEN_REFUSALS))
def test_refusals(case, tmp_path):
    build, match = QWEN_REFUSALS[case]
    assert_refused(export_qwen2_moe, build(), tmp_path, match)
