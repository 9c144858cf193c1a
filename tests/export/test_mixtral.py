"""Mixtral export: both layouts load with from_pretrained and reproduce our logits and greedy continuation; what
Mixtral cannot express is refused before anything is written.
"""

import json
import re

import pytest
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import upcycle
from upcycle.adapters.base import ensure_record
from upcycle.export.mixtral import export_mixtral
from upcycle.layers import Experts

from .helpers import (
    BACKBONE,
    EXPERTS,
    REFUSALS,
    SIZES,
    WIDTH,
    assert_backbone_config,
    assert_no_training_noise,
    assert_provenance,
    assert_refused,
    assert_round_trip,
    converted,
    first_moe,
    tensor_names,
    tiny_llama,
)

NAMES = ("Mixtral", "'mixtral'")  # the exporter's and the format registry's spelling


# ---- round trips --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["legacy", "fused"])
def test_round_trip(layout, tmp_path):
    model = converted()
    out = export_mixtral(model, tmp_path / "mixtral", layout=layout)
    assert_round_trip(model, out, "MixtralForCausalLM")
    config = json.loads((out / "config.json").read_text())
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["intermediate_size"]) == (4, 2, 64)
    note = assert_provenance(model, out, "mixtral")
    assert note["layout"] == layout and note["source"]["adapter"] == "hf_llama"
    assert note["convert"]["method"] == "sparse_upcycling"


def test_the_exported_router_adds_no_jitter_in_training_mode(tmp_path):
    """Our router noise is training-time only and off here; the export must not add Mixtral's router jitter."""
    assert_no_training_noise(export_mixtral(converted(), tmp_path / "mixtral"))


def test_the_config_keeps_the_sources_backbone_settings(tmp_path):
    model = converted(tiny_llama(**BACKBONE))
    out = export_mixtral(model, tmp_path / "mixtral")
    assert_backbone_config(out, model)
    assert_round_trip(model, out, "MixtralForCausalLM")


def test_a_one_layer_model_exports(tmp_path):
    model = converted(tiny_llama(num_hidden_layers=1))
    assert_round_trip(model, export_mixtral(model, tmp_path / "mixtral"), "MixtralForCausalLM")


def test_moe_layers_installed_without_a_wrapper_export(tmp_path):
    """An MoE that sits in the model as the layer's mlp itself (no MoEFFN around it) is read as it is."""
    model = converted()
    for layer in model.model.layers:
        layer.mlp = layer.mlp.moe
    assert_round_trip(model, export_mixtral(model, tmp_path / "mixtral"), "MixtralForCausalLM")


def test_tokenizer_files_travel_into_the_export(tmp_path):
    """Copied as they are, but for the tokenizer class, which becomes the one transformers 4 and llama.cpp's converter
    build from tokenizer.json (transformers v5 saves a class name they do not know)."""
    saved = upcycle.save(converted(), tmp_path / "saved")
    (saved / "tokenizer.json").write_text('{"version": "1.0"}')
    (saved / "tokenizer_config.json").write_text('{"tokenizer_class": "TokenizersBackend", "model_max_length": 7}')
    out = export_mixtral(upcycle.load(saved), tmp_path / "mixtral")
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}'
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config == {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 7}


@pytest.mark.parametrize("top_k", [1, 3])
def test_top_k_is_exported(top_k, tmp_path):
    """num_experts_per_tok carries the router's k: without it a top-1 model would load routing top-2 (the default)."""
    model = converted(top_k=top_k)
    out = export_mixtral(model, tmp_path / "mixtral")
    assert json.loads((out / "config.json").read_text())["num_experts_per_tok"] == top_k
    assert_round_trip(model, out, "MixtralForCausalLM")


def test_layouts_name_tensors_as_documented(tmp_path):
    """Fused by default (transformers v5 loads it without conversion); legacy for v4, vLLM and llama.cpp's converter."""
    model = converted()
    legacy = tensor_names(export_mixtral(model, tmp_path / "legacy", layout="legacy"))
    fused = tensor_names(export_mixtral(model, tmp_path / "fused"))
    assert "model.layers.2.block_sparse_moe.gate.weight" in legacy
    assert {f"model.layers.0.block_sparse_moe.experts.3.{w}.weight" for w in ("w1", "w2", "w3")} <= legacy
    assert {"model.layers.1.mlp.gate.weight", "model.layers.1.mlp.experts.gate_up_proj"} <= fused
    assert not any(".mlp." in name for name in legacy) and not any("block_sparse" in name for name in fused)


def test_tied_embeddings_and_head_dim(tmp_path):
    model = converted(tiny_llama(tie_word_embeddings=True, head_dim=16))
    out = export_mixtral(model, tmp_path / "mixtral")
    assert "lm_head.weight" in tensor_names(out)  # llama.cpp's converter reads it as the output head
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert_round_trip(model, out, "MixtralForCausalLM")


def test_mistral_sliding_window(tmp_path):
    dense = MistralForCausalLM(MistralConfig(**SIZES, sliding_window=4)).eval()  # shorter than the test sequences
    model = converted(dense)
    out = export_mixtral(model, tmp_path / "mixtral")
    assert json.loads((out / "config.json").read_text())["sliding_window"] == 4
    assert_round_trip(model, out, "MixtralForCausalLM")


def bias_free_qwen2(**windows) -> Qwen2ForCausalLM:
    """A Qwen2 source without the q/k/v biases Mixtral lacks, so only its attention windows decide."""
    dense = Qwen2ForCausalLM(Qwen2Config(**SIZES, use_sliding_window=True, sliding_window=4, **windows)).eval()
    for layer in dense.model.layers:
        for projection in ("q_proj", "k_proj", "v_proj"):
            getattr(layer.self_attn, projection).bias = None
    return dense


def test_per_layer_sliding_windows_are_refused(tmp_path):
    """Mixtral has one sliding_window for every layer: a source whose layers differ (Qwen2's max_window_layers) is
    refused."""
    dense = bias_free_qwen2(max_window_layers=2)
    assert len(set(dense.config.layer_types)) == 2  # full attention below, a window above
    match = "mixes sliding and full attention layers " + re.escape(f"({dense.config.layer_types})")
    assert_refused(export_mixtral, converted(dense), tmp_path, match, NAMES)


def test_a_window_that_no_layer_uses_is_not_exported(tmp_path):
    """Qwen2 with every layer below max_window_layers attends fully: Mixtral must not apply its sliding_window."""
    dense = bias_free_qwen2(max_window_layers=SIZES["num_hidden_layers"])
    assert set(dense.config.layer_types) == {"full_attention"}
    model = converted(dense)
    out = export_mixtral(model, tmp_path / "mixtral")
    assert json.loads((out / "config.json").read_text())["sliding_window"] is None
    assert_round_trip(model, out, "MixtralForCausalLM")  # 12 tokens: a window of 4 would change the logits


def test_overwrite(tmp_path):
    model = converted()
    out = export_mixtral(model, tmp_path / "mixtral")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_mixtral(model, out)
    export_mixtral(model, out, layout="legacy", overwrite=True)
    assert json.loads((out / "upcycle_export.json").read_text())["layout"] == "legacy"


def test_unknown_layout(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        export_mixtral(converted(), tmp_path / "out", layout="stacked")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals(case, tmp_path):
    build, match = REFUSALS[case]
    assert_refused(export_mixtral, build(), tmp_path, match, NAMES)


def with_experts(model, d_hidden: int = 64, activation: str = "silu"):
    """Layer 0's experts replaced by gated, bias-free ones of another width or activation."""
    first_moe(model).experts = Experts(EXPERTS, WIDTH, d_hidden, activation=activation, gated=True, bias=False)
    return model


def with_record_only(model):
    """A dense model with a record (as upcycle.save writes for one) but no MoE layer."""
    ensure_record(model)
    return model


# the whole reason and what to do about it, so a reworded, truncated or mis-addressed message shows
MESSAGES = {
    "partial": (
        REFUSALS["partial"][0],
        "decoder layers [0, 2] are still dense FFNs, but every Mixtral layer is a sparse MoE block; convert with "
        "layers='all', or use export_qwen2_moe, which keeps dense layers (mlp_only_layers)",
    ),
    "not renormalised": (
        REFUSALS["not renormalised"][0],
        "the router does not renormalise the top-k weights (renormalize=False), but Mixtral always divides them by "
        "their sum; convert with router_renormalize=True, or use export_qwen2_moe (norm_topk_prob=False)",
    ),
    "soft router": (
        REFUSALS["soft router"][0],
        "layer 0: its router is SoftMoERouter, not token-choice top-k; Mixtral sends each token to its top-k experts "
        "by softmax probability (convert with router type 'topk')",
    ),
    "expert biases": (
        REFUSALS["expert biases"][0],
        "layer 0: its experts have biases (b_up, b_gate, b_down, from a source with mlp_bias=True); Mixtral's expert "
        "projections have none",
    ),
    "gated gelu experts": (
        lambda: with_experts(converted(), activation="gelu"),
        "layer 0: its experts are gated gelu FFNs; Mixtral's experts are SiLU-gated: down(silu(gate·x) ⊙ up·x)",
    ),
    "expert widths": (
        lambda: with_experts(converted(), d_hidden=48),
        "MoE layers differ in d_hidden ({0: 48, 1: 64, 2: 64}); Mixtral's config holds one value",
    ),
    "activation": (
        REFUSALS["activation"][0],
        "the source activation is 'gelu', but Mixtral's MLPs and experts compute silu(gate·x) ⊙ up·x; only "
        "SiLU-gated sources (hidden_act='silu') can be exported",
    ),
    "attention bias": (
        REFUSALS["attention bias"][0],
        "the source attention projections ['q_proj', 'k_proj', 'v_proj', 'o_proj'] have biases (e.g. Llama "
        "attention_bias=True), but in Mixtral's attention no projection has a bias",
    ),
    "not converted": (
        REFUSALS["not converted"][0],
        "the model has no conversion record; export a model returned by upcycle.convert",
    ),
    "no MoE layer": (
        lambda: with_record_only(tiny_llama()),
        "the model has no MoE layer (the layer selection of upcycle.convert matched none)",
    ),
}


@pytest.mark.parametrize("case", list(MESSAGES))
def test_refusal_messages_in_full(case, tmp_path):
    """Each refusal names Mixtral, says exactly what stands in the way and how to convert or export instead."""
    build, message = MESSAGES[case]
    assert_refused(export_mixtral, build(), tmp_path, re.escape(message) + "$", NAMES)
