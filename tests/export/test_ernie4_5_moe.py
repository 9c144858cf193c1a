"""ERNIE-4.5-MoE export: a converted ERNIE-4.5 dense LM (interleaved RoPE, free head_dim) loads with from_pretrained
as Ernie4_5_MoeForCausalLM and reproduces our logits and cached greedy continuation, with dense layers in a
progression, shared experts and tied embeddings; what ERNIE-4.5-MoE cannot express is refused before anything is
written, and the other MoE formats refuse an ERNIE source (its RoPE rotates interleaved pairs)."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import Ernie4_5Config, Ernie4_5ForCausalLM

import upcycle
from upcycle.export.ernie4_5_moe import export_ernie4_5_moe

from .helpers import (
    SIZES,
    add_shared_expert,
    assert_provenance,
    assert_refused,
    assert_round_trip,
    converted,
    first_moe,
    tensor_names,
    tiny_llama,
    with_router_bias,
)

NAMES = ("ERNIE-4.5-MoE", "'ernie4_5_moe'")
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # inside the tiny vocabulary


def tiny_ernie(**overrides) -> Ernie4_5ForCausalLM:
    """ERNIE-4.5 with head_dim apart from hidden_size / heads, an untied head (ERNIE ties by default) and norms
    away from 1, so every copied tensor matters."""
    config = Ernie4_5Config(**{**SIZES, **TOKENS, "head_dim": 16, "tie_word_embeddings": False, **overrides})
    model = Ernie4_5ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def read_config(directory) -> dict:
    return json.loads((directory / "config.json").read_text())


def test_full_conversion(tmp_path):
    model = converted(tiny_ernie())
    out = export_ernie4_5_moe(model, tmp_path / "ernie")
    assert_round_trip(model, out, "Ernie4_5_MoeForCausalLM")
    config = read_config(out)
    assert (config["moe_num_experts"], config["moe_k"], config["moe_intermediate_size"]) == (4, 2, 64)
    assert (config["moe_layer_start_index"], config["moe_layer_end_index"], config["moe_layer_interval"]) == (0, 2, 1)
    assert (config["moe_num_shared_experts"], config["head_dim"], config["use_bias"]) == (0, 16, False)
    names = tensor_names(out)
    assert {"model.layers.2.mlp.experts.3.down_proj.weight", "model.layers.0.mlp.gate.weight"} <= names
    with safe_open(str(out / "model.safetensors"), "pt") as handle:  # the top-k is chosen by the probabilities alone
        assert not handle.get_tensor("model.layers.1.mlp.moe_statics.e_score_correction_bias").any()
    assert assert_provenance(model, out, "ernie4_5_moe")["source"]["model_type"] == "ernie4_5"


@pytest.mark.parametrize(
    ("layers", "progression", "dense"),
    [("last_half", (2, 3, 1), [0, 1]), ([1], (1, 1, 1), [0, 2, 3]), ([1, 3], (1, 3, 2), [0, 2])],
)
def test_partial_conversion(layers, progression, dense, tmp_path):
    """Dense layers where ERNIE's (start, end, interval) rule puts them, with the source's MLP."""
    model = converted(tiny_ernie(num_hidden_layers=4), layers=layers)
    out = export_ernie4_5_moe(model, tmp_path / "ernie")
    config = read_config(out)
    assert (config["moe_layer_start_index"], config["moe_layer_end_index"], config["moe_layer_interval"]) == progression
    assert config["intermediate_size"] == 64 and f"model.layers.{dense[0]}.mlp.down_proj.weight" in tensor_names(out)
    assert_round_trip(model, out, "Ernie4_5_MoeForCausalLM")


@pytest.mark.parametrize("top_k", [1, 3])
def test_top_k_is_exported(top_k, tmp_path):
    model = converted(tiny_ernie(), top_k=top_k)
    out = export_ernie4_5_moe(model, tmp_path / "ernie")
    assert read_config(out)["moe_k"] == top_k
    assert_round_trip(model, out, "Ernie4_5_MoeForCausalLM")


@pytest.mark.parametrize("width", [64, 128])
def test_an_ungated_shared_expert_is_moe_num_shared_experts_wide(width, tmp_path):
    model = add_shared_expert(converted(tiny_ernie()), width=width, gate=False)
    out = export_ernie4_5_moe(model, tmp_path / "ernie")
    assert read_config(out)["moe_num_shared_experts"] == width // 64
    assert "model.layers.0.mlp.shared_experts.up_proj.weight" in tensor_names(out)
    assert_round_trip(model, out, "Ernie4_5_MoeForCausalLM")


def test_a_shared_expert_on_some_layers_only(tmp_path):
    """ERNIE gives every MoE layer the shared MLP: a layer without ours gets zeros, which add exactly 0."""
    model = add_shared_expert(converted(tiny_ernie()), width=64, gate=False)
    model.model.layers[1].mlp.moe.shared_expert = None
    assert_round_trip(model, export_ernie4_5_moe(model, tmp_path / "ernie"), "Ernie4_5_MoeForCausalLM")


def test_tied_embeddings_in_bfloat16(tmp_path):
    model = converted(tiny_ernie(tie_word_embeddings=True).to(torch.bfloat16))
    out = export_ernie4_5_moe(model, tmp_path / "ernie")
    assert read_config(out)["tie_word_embeddings"] is True and read_config(out)["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()  # tied again


def test_auto_picks_ernie4_5_moe(tmp_path):
    from upcycle.export import chosen_format
    from upcycle.run import export_model

    export_model(converted(tiny_ernie()), tmp_path / "auto", "auto")
    assert chosen_format(tmp_path / "auto") == "ernie4_5_moe"


# ---- refusals -----------------------------------------------------------------------------------------------------
ERNIE_REFUSALS = {
    "gaps": (
        lambda: converted(tiny_ernie(num_hidden_layers=4), layers=[0, 2, 3]),
        r"MoE layers \[0, 2, 3\] are not every interval-th layer of a range",
    ),
    "use_bias": (lambda: converted(tiny_ernie(use_bias=True)), "use_bias=True.*experts have none"),
    "not renormalised": (lambda: converted(tiny_ernie(), router_renormalize=False), "renormalize=False"),
    "router bias": (lambda: with_router_bias(converted(tiny_ernie())), "router has a bias"),
    "gated shared expert": (
        lambda: add_shared_expert(converted(tiny_ernie()), width=64),
        "scaled by a sigmoid gate, but ERNIE-4.5-MoE adds its shared MLP unweighted",
    ),
    "shared width": (
        lambda: add_shared_expert(converted(tiny_ernie()), width=24, gate=False),
        "shared expert width 24 is not a multiple of the expert width 64",
    ),
    "unit weights": (lambda: converted(tiny_ernie(), method="neuron_split"), "unit_weights"),
    "activation": (lambda: converted(tiny_ernie(hidden_act="gelu")), "activation is 'gelu'"),
    "llama source": (
        lambda: converted(tiny_llama()),
        r"'ernie4_5_moe' needs a \*ForCausalLM of one of \('ernie4_5',\)",
    ),
}


@pytest.mark.parametrize("case", list(ERNIE_REFUSALS))
def test_refusals(case, tmp_path):
    build, match = ERNIE_REFUSALS[case]
    assert_refused(export_ernie4_5_moe, build(), tmp_path, match, NAMES)


@pytest.mark.parametrize("format", ["mixtral", "qwen2_moe", "qwen3_moe", "hunyuan_v1_moe"])
def test_other_twins_refuse_an_ernie_source(format, tmp_path):
    """Mixtral would load it and compute something else: ERNIE rotates interleaved pairs, Mixtral rotate-half."""
    export = lambda model, out: upcycle.export(model, out, format=format)  # noqa: E731
    assert_refused(export, converted(tiny_ernie()), tmp_path, "model_type 'ernie4_5'", (f"'{format}'",))


def test_the_router_is_read_from_the_gate(tmp_path):
    """A mutation guard: the router written is ours (a zeroed router would route every token alike)."""
    model = converted(tiny_ernie())
    out = export_ernie4_5_moe(model, tmp_path / "ernie")
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        torch.testing.assert_close(handle.get_tensor("model.layers.0.mlp.gate.weight"),
                                   first_moe(model).router.gate.weight)  # fmt: skip
