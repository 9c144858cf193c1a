"""Qwen3-MoE export: a converted Qwen3 (q/k norms, free head_dim) loads with from_pretrained as Qwen3MoeForCausalLM
and reproduces our logits and cached greedy continuation, with dense layers, raw top-k, attention biases and a
uniform sliding window; what Qwen3-MoE cannot express, and Qwen3 sources sent to Mixtral / Qwen2-MoE, are refused."""

import json
import re

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import upcycle
from upcycle.export.qwen3_moe import export_qwen3_moe

from .helpers import (
    add_shared_expert,
    assert_provenance,
    assert_refused,
    assert_round_trip,
    converted,
    tensor_dtypes,
    tensor_names,
    tiny_llama,
    tiny_qwen3,
    with_hidden_norm,
    with_plain_experts,
    with_router_bias,
    with_shared_bias,
)

NAMES = ("Qwen3-MoE", "'qwen3_moe'")  # the exporter's and the format registry's spelling


def read_config(directory) -> dict:
    return json.loads((directory / "config.json").read_text())


def test_full_conversion(tmp_path):
    model = converted(tiny_qwen3())
    out = export_qwen3_moe(model, tmp_path / "qwen3")
    assert_round_trip(model, out, "Qwen3MoeForCausalLM")
    config = read_config(out)
    assert (config["num_local_experts"], config["num_experts"], config["num_experts_per_tok"]) == (4, 4, 2)
    assert (config["moe_intermediate_size"], config["head_dim"], config["norm_topk_prob"]) == (64, 16, True)
    assert (config["mlp_only_layers"], config["decoder_sparse_step"], config["attention_bias"]) == ([], 1, False)
    with safe_open(str(out / "model.safetensors"), "pt") as handle:  # the per-head norms are carried over
        torch.testing.assert_close(handle.get_tensor("model.layers.1.self_attn.k_norm.weight"),
                                   model.model.layers[1].self_attn.k_norm.weight)  # fmt: skip
    assert "model.layers.2.mlp.experts.3.down_proj.weight" in tensor_names(out)
    assert assert_provenance(model, out, "qwen3_moe")["source"]["model_type"] == "qwen3"


@pytest.mark.parametrize(("layers", "dense"), [([1], [0, 2]), ("last_half", [0])])
def test_partial_conversion(layers, dense, tmp_path):
    model = converted(tiny_qwen3(), layers=layers)
    out = export_qwen3_moe(model, tmp_path / "qwen3")
    assert_round_trip(model, out, "Qwen3MoeForCausalLM")
    config = read_config(out)
    assert config["mlp_only_layers"] == dense and config["intermediate_size"] == 64
    assert f"model.layers.{dense[0]}.mlp.down_proj.weight" in tensor_names(out)


@pytest.mark.parametrize(("top_k", "renormalize"), [(1, True), (3, False)])
def test_top_k_and_renormalisation_are_exported(top_k, renormalize, tmp_path):
    """Qwen3-MoE's defaults are k = 8 and norm_topk_prob = False: both must come from the router."""
    model = converted(tiny_qwen3(), top_k=top_k, router_renormalize=renormalize)
    out = export_qwen3_moe(model, tmp_path / "qwen3")
    assert (read_config(out)["num_experts_per_tok"], read_config(out)["norm_topk_prob"]) == (top_k, renormalize)
    assert_round_trip(model, out, "Qwen3MoeForCausalLM")


def test_attention_biases_are_carried_over(tmp_path):
    model = converted(tiny_qwen3(attention_bias=True))
    with torch.no_grad():
        for projection in ("q_proj", "o_proj"):
            getattr(model.model.layers[0].self_attn, projection).bias.normal_()
    out = export_qwen3_moe(model, tmp_path / "qwen3")
    assert read_config(out)["attention_bias"] is True
    assert_round_trip(model, out, "Qwen3MoeForCausalLM")


def test_a_sliding_window_on_every_layer(tmp_path):
    dense = tiny_qwen3(use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert set(dense.config.layer_types) == {"sliding_attention"}  # shorter than the test sequences, so it matters
    model = converted(dense)
    out = export_qwen3_moe(model, tmp_path / "qwen3")
    assert (read_config(out)["use_sliding_window"], read_config(out)["sliding_window"]) == (True, 4)
    assert_round_trip(model, out, "Qwen3MoeForCausalLM")


def test_tied_embeddings_in_bfloat16(tmp_path):
    model = converted(tiny_qwen3(tie_word_embeddings=True).to(torch.bfloat16), layers=[0, 2])
    out = export_qwen3_moe(model, tmp_path / "qwen3")
    assert set(tensor_dtypes(out).values()) == {torch.bfloat16} and read_config(out)["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()  # tied again


def test_auto_picks_qwen3_moe_for_a_qwen3_source(tmp_path):
    from upcycle.run import export_model

    assert export_model(converted(tiny_qwen3()), tmp_path / "auto", "auto") == str(tmp_path / "auto")
    assert read_config(tmp_path / "auto")["model_type"] == "qwen3_moe"


# ---- refusals -----------------------------------------------------------------------------------------------------
def with_mixed_windows():
    dense = tiny_qwen3(use_sliding_window=True, sliding_window=4, max_window_layers=2)
    return converted(dense)


QWEN3_REFUSALS = {
    "llama source": (
        lambda: converted(tiny_llama()),
        re.escape("but the source's has no such norms (only Qwen3 sources do); export with format 'mixtral' or"),
    ),
    "shared expert": (lambda: add_shared_expert(converted(tiny_qwen3())), r"layers \[0, 1, 2\] have a shared expert"),
    "mixed windows": (with_mixed_windows, r"mixes sliding and full attention layers .*one sliding_window"),
    "unit weights": (lambda: converted(tiny_qwen3(), method="neuron_split"), "unit_weights"),
    "router bias": (lambda: with_router_bias(converted(tiny_qwen3())), "router has a bias"),
    "capacity": (lambda: converted(tiny_qwen3(), router_capacity_factor=1.0), "capacity_factor=1.0"),
    "soft router": (lambda: converted(tiny_qwen3(), router_type="soft"), "SoftMoERouter, not token-choice top-k"),
    "shared bias": (lambda: with_shared_bias(converted(tiny_qwen3())), "shared output bias"),
    "hidden norm": (lambda: with_hidden_norm(converted(tiny_qwen3())), "hidden LayerNorm"),
    "plain experts": (lambda: with_plain_experts(converted(tiny_qwen3())), "plain silu FFNs.*SiLU-gated"),
    "activation": (lambda: converted(tiny_qwen3(hidden_act="gelu")), "activation is 'gelu'.*hidden_act='silu'"),
}


@pytest.mark.parametrize("case", list(QWEN3_REFUSALS))
def test_refusals(case, tmp_path):
    build, match = QWEN3_REFUSALS[case]
    assert_refused(export_qwen3_moe, build(), tmp_path, match, NAMES)


@pytest.mark.parametrize(("format", "target"), [("mixtral", "Mixtral"), ("qwen2_moe", "Qwen2-MoE")])
def test_formats_without_qk_norms_refuse_a_qwen3_source(format, target, tmp_path):
    match = re.escape(f"(q_norm / k_norm, as Qwen3's does), which {target}'s attention has not; export a Qwen3")
    export = lambda model, out: upcycle.export(model, out, format=format)  # noqa: E731
    assert_refused(export, converted(tiny_qwen3()), tmp_path, match, (target,))
