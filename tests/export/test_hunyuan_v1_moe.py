"""HunYuan-MoE export: a converted HunYuan dense LM (per-head query / key RMSNorms after RoPE, free head_dim) loads
with from_pretrained as HunYuanMoEV1ForCausalLM and reproduces our logits and cached greedy continuation, with the
always-present shared MLP zero or ours, attention biases and NTK-alpha RoPE; what HunYuan-MoE cannot express is
refused before anything is written, and the other MoE formats refuse a HunYuan source."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import HunYuanDenseV1Config, HunYuanDenseV1ForCausalLM

import upcycle
from upcycle.export.hunyuan_v1_moe import export_hunyuan_v1_moe

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

NAMES = ("HunYuan-MoE", "'hunyuan_v1_moe'")
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # inside the tiny vocabulary


def tiny_hunyuan(**overrides) -> HunYuanDenseV1ForCausalLM:
    """HunYuan dense with head_dim apart from hidden_size / heads and norms (the per-head ones too) away from 1."""
    model = HunYuanDenseV1ForCausalLM(HunYuanDenseV1Config(**{**SIZES, **TOKENS, "head_dim": 16, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def read_config(directory) -> dict:
    return json.loads((directory / "config.json").read_text())


def test_full_conversion(tmp_path):
    model = converted(tiny_hunyuan())
    out = export_hunyuan_v1_moe(model, tmp_path / "hunyuan")
    assert_round_trip(model, out, "HunYuanMoEV1ForCausalLM")
    config = read_config(out)
    assert (config["num_experts"], config["moe_topk"], config["intermediate_size"]) == (4, 2, 64)
    assert config["head_dim"] == 16
    names = tensor_names(out)
    assert {"model.layers.2.mlp.experts.3.down_proj.weight", "model.layers.0.mlp.gate.wg.weight"} <= names
    with safe_open(str(out / "model.safetensors"), "pt") as handle:  # no shared expert: the shared MLP adds 0
        assert not handle.get_tensor("model.layers.1.mlp.shared_mlp.down_proj.weight").any()
        torch.testing.assert_close(handle.get_tensor("model.layers.1.self_attn.query_layernorm.weight"),
                                   model.model.layers[1].self_attn.query_layernorm.weight)  # fmt: skip
        torch.testing.assert_close(handle.get_tensor("model.layers.0.mlp.gate.wg.weight"),
                                   first_moe(model).router.gate.weight)  # fmt: skip
    assert assert_provenance(model, out, "hunyuan_v1_moe")["source"]["model_type"] == "hunyuan_v1_dense"


def test_an_ungated_shared_expert_is_the_shared_mlp(tmp_path):
    model = add_shared_expert(converted(tiny_hunyuan()), width=64, gate=False)
    model.model.layers[2].mlp.moe.shared_expert = None  # this layer's shared MLP is written as zeros
    out = export_hunyuan_v1_moe(model, tmp_path / "hunyuan")
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert handle.get_tensor("model.layers.0.mlp.shared_mlp.up_proj.weight").any()
    assert_round_trip(model, out, "HunYuanMoEV1ForCausalLM")


@pytest.mark.parametrize("top_k", [1, 3])
def test_top_k_is_exported(top_k, tmp_path):
    model = converted(tiny_hunyuan(), top_k=top_k)
    out = export_hunyuan_v1_moe(model, tmp_path / "hunyuan")
    assert read_config(out)["moe_topk"] == top_k
    assert_round_trip(model, out, "HunYuanMoEV1ForCausalLM")


def test_attention_biases_and_ntk_alpha_rope(tmp_path):
    rope = {"rope_type": "dynamic", "rope_theta": 10000.0, "alpha": 1000.0, "factor": 1.0}
    model = converted(tiny_hunyuan(attention_bias=True, rope_parameters=rope))
    assert model.model.rotary_emb.rope_type == "ntk_alpha"  # a stretched base, so a dropped alpha shows
    out = export_hunyuan_v1_moe(model, tmp_path / "hunyuan")
    assert read_config(out)["attention_bias"] is True
    assert_round_trip(model, out, "HunYuanMoEV1ForCausalLM")


def test_tied_embeddings_in_bfloat16(tmp_path):
    model = converted(tiny_hunyuan(tie_word_embeddings=True).to(torch.bfloat16))
    out = export_hunyuan_v1_moe(model, tmp_path / "hunyuan")
    assert read_config(out)["tie_word_embeddings"] is True and read_config(out)["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()  # tied again


def test_auto_picks_hunyuan_v1_moe(tmp_path):
    from upcycle.export import chosen_format
    from upcycle.run import export_model

    export_model(converted(tiny_hunyuan()), tmp_path / "auto", "auto")
    assert chosen_format(tmp_path / "auto") == "hunyuan_v1_moe"


def test_auto_falls_back_to_the_generic_class_for_a_partial_conversion(tmp_path):
    from upcycle.export import chosen_format

    upcycle.export(converted(tiny_hunyuan(), layers=[1]), tmp_path / "auto", format="auto")
    assert chosen_format(tmp_path / "auto") == "hf_generic"


# ---- refusals -----------------------------------------------------------------------------------------------------
HUNYUAN_REFUSALS = {
    "partial": (lambda: converted(tiny_hunyuan(), layers=[1]), r"layers \[0, 2\] are still dense"),
    "not renormalised": (lambda: converted(tiny_hunyuan(), router_renormalize=False), "renormalize=False"),
    "router bias": (lambda: with_router_bias(converted(tiny_hunyuan())), "router has a bias"),
    "gated shared expert": (
        lambda: add_shared_expert(converted(tiny_hunyuan()), width=64),
        "scaled by a sigmoid gate, but HunYuan-MoE adds its shared MLP unweighted",
    ),
    "shared width": (
        lambda: add_shared_expert(converted(tiny_hunyuan()), width=24, gate=False),
        "shared expert is 24 wide, but HunYuan-MoE's shared MLP has the experts' width",
    ),
    "unit weights": (lambda: converted(tiny_hunyuan(), method="neuron_split"), "unit_weights"),
    "activation": (lambda: converted(tiny_hunyuan(hidden_act="gelu")), "activation is 'gelu'"),
    "llama source": (
        lambda: converted(tiny_llama()),
        r"'hunyuan_v1_moe' needs a \*ForCausalLM of one of \('hunyuan_v1_dense',\)",
    ),
}


@pytest.mark.parametrize("case", list(HUNYUAN_REFUSALS))
def test_refusals(case, tmp_path):
    build, match = HUNYUAN_REFUSALS[case]
    assert_refused(export_hunyuan_v1_moe, build(), tmp_path, match, NAMES)


@pytest.mark.parametrize("format", ["mixtral", "qwen2_moe", "qwen3_moe", "ernie4_5_moe"])
def test_other_twins_refuse_a_hunyuan_source(format, tmp_path):
    export = lambda model, out: upcycle.export(model, out, format=format)  # noqa: E731
    assert_refused(export, converted(tiny_hunyuan()), tmp_path, "model_type 'hunyuan_v1_dense'", (f"'{format}'",))
