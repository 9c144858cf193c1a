"""Phi-3 as Mixtral: a converted Phi3ForCausalLM (fused qkv_proj and gate_up_proj) exports unfused, loads with
from_pretrained as MixtralForCausalLM and reproduces our logits and cached greedy continuation, with a sliding window,
tied embeddings and both layouts; the RoPE variants Mixtral cannot follow (partial rotary, longrope) are refused
before anything is written, and the Qwen MoE formats refuse Phi-3."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import Phi3Config, Phi3ForCausalLM

import upcycle
from upcycle.export.mixtral import export_mixtral

from .helpers import (
    SIZES,
    assert_provenance,
    assert_refused,
    assert_round_trip,
    converted,
    tensor_names,
    with_router_bias,
)

NAMES = ("Mixtral", "'mixtral'")
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # inside the tiny vocabulary


def tiny_phi3(**overrides) -> Phi3ForCausalLM:
    """Phi-3 with GQA (4 query, 2 key/value heads, so the q / k / v blocks of qkv_proj differ in size) and norms
    away from 1, so every split and copied tensor matters."""
    model = Phi3ForCausalLM(Phi3Config(**{**SIZES, **TOKENS, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("layout", ["legacy", "fused"])
def test_round_trip(layout, tmp_path):
    model = converted(tiny_phi3())
    out = export_mixtral(model, tmp_path / "mixtral", layout=layout)
    assert_round_trip(model, out, "MixtralForCausalLM")
    assert assert_provenance(model, out, "mixtral")["source"]["adapter"] == "hf_phi3"
    assert not any("qkv_proj" in name for name in tensor_names(out))  # unfused, as Mixtral's attention


def test_qkv_proj_is_split_into_q_k_v_rows(tmp_path):
    """Phi3Attention reads queries, keys and values from consecutive row blocks [H·hd | K·hd | K·hd] of qkv_proj."""
    model = converted(tiny_phi3())
    out = export_mixtral(model, tmp_path / "mixtral")
    qkv = model.model.layers[1].self_attn.qkv_proj.weight  # [(4 + 2·2)·8, 32]
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        q, k, v = (handle.get_tensor(f"model.layers.1.self_attn.{p}_proj.weight") for p in "qkv")
    assert (q.shape, k.shape, v.shape) == ((32, 32), (16, 32), (16, 32))
    torch.testing.assert_close(torch.cat([q, k, v]), qkv, rtol=0, atol=0)


def test_a_sliding_window_on_every_layer(tmp_path):
    model = converted(tiny_phi3(sliding_window=4))  # shorter than the test sequences, so it matters
    out = export_mixtral(model, tmp_path / "mixtral")
    assert json.loads((out / "config.json").read_text())["sliding_window"] == 4
    assert_round_trip(model, out, "MixtralForCausalLM")


def test_tied_embeddings(tmp_path):
    model = converted(tiny_phi3(tie_word_embeddings=True))
    out = export_mixtral(model, tmp_path / "mixtral")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert_round_trip(model, out, "MixtralForCausalLM")


def test_auto_picks_mixtral_for_phi3(tmp_path):
    from upcycle.export import chosen_format
    from upcycle.run import export_model

    export_model(converted(tiny_phi3()), tmp_path / "auto", "auto")
    assert chosen_format(tmp_path / "auto") == "mixtral"


def test_gguf_llama_holds_the_split_projections(tmp_path):
    """GGUF's llama architecture (the Mixtral twin llama.cpp computes) gets q / k / v from the same split."""
    from .test_gguf import read, undo_interleave

    model = converted(tiny_phi3())
    tensors, fields = read(upcycle.export(model, tmp_path / "gguf", format="gguf"))
    assert fields["general.architecture"] == "llama" and not any("qkv" in name for name in tensors)
    q = undo_interleave(tensors["blk.1.attn_q.weight"][0], SIZES["num_attention_heads"])  # llama.cpp's RoPE order
    k = undo_interleave(tensors["blk.1.attn_k.weight"][0], SIZES["num_key_value_heads"])
    qkv = model.model.layers[1].self_attn.qkv_proj.weight.detach()
    assert torch.equal(torch.cat([q, k, tensors["blk.1.attn_v.weight"][0]]), qkv)


# ---- refusals -----------------------------------------------------------------------------------------------------
LONGROPE = dict(
    rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4,
                     "long_factor": [2.0] * 4, "original_max_position_embeddings": 16},
    max_position_embeddings=64,
)  # fmt: skip

PHI3_REFUSALS = {
    "partial rotary": (
        lambda: converted(tiny_phi3(partial_rotary_factor=0.5)),
        r"partial_rotary_factor=0.5\), but 'mixtral' rotates every dimension of each head",
    ),
    "longrope": (lambda: converted(tiny_phi3(**LONGROPE)), "RoPE is 'longrope'.*recomputes the KV cache"),
    "partial": (lambda: converted(tiny_phi3(), layers=[1]), r"layers \[0, 2\] are still dense"),
    "not renormalised": (lambda: converted(tiny_phi3(), router_renormalize=False), "renormalize=False"),
    "router bias": (lambda: with_router_bias(converted(tiny_phi3())), "router has a bias"),
    "activation": (lambda: converted(tiny_phi3(hidden_act="gelu")), "activation is 'gelu'"),
}


@pytest.mark.parametrize("case", list(PHI3_REFUSALS))
def test_refusals(case, tmp_path):
    build, match = PHI3_REFUSALS[case]
    assert_refused(lambda model, out: upcycle.export(model, out, format="mixtral"), build(), tmp_path, match, NAMES)


def test_auto_falls_back_to_the_generic_class_for_longrope(tmp_path):
    from upcycle.export import chosen_format

    upcycle.export(converted(tiny_phi3(**LONGROPE)), tmp_path / "auto", format="auto")
    assert chosen_format(tmp_path / "auto") == "hf_generic"


@pytest.mark.parametrize("format", ["qwen2_moe", "qwen3_moe", "ernie4_5_moe", "hunyuan_v1_moe"])
def test_other_twins_refuse_phi3(format, tmp_path):
    export = lambda model, out: upcycle.export(model, out, format=format)  # noqa: E731
    assert_refused(export, converted(tiny_phi3()), tmp_path, "'hf_phi3' adapter export as 'mixtral'", (f"'{format}'",))
