"""GGUF export: each architecture (llama for Mixtral-style Llama/Mistral, qwen2moe, qwen3moe) is read back with
gguf's own reader and every tensor and the key metadata equal the model's, in the names, stacking, permutation and
types of llama.cpp's converter; what llama.cpp's graphs cannot express is refused before anything is written."""

import re
import sys

import numpy as np
import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import upcycle
from upcycle.export.gguf import export_gguf

from .helpers import SIZES, VOCAB, assert_refused, converted, tiny_llama, tiny_qwen3, with_tokenizer

gguf = pytest.importorskip("gguf")

BUILD = {  # arch -> a model llama.cpp's graph for it computes exactly (dense: the source's config overrides)
    "llama": lambda dense=None, **convert: converted(tiny_llama(**(dense or {})), **convert),
    "qwen2moe": lambda dense=None, **convert: converted(tiny_llama(**(dense or {})), router_renormalize=False,
                                                        **convert),
    "qwen3moe": lambda dense=None, **convert: converted(tiny_qwen3(**(dense or {})), **convert),
}  # fmt: skip
ARCHES = pytest.mark.parametrize("arch", list(BUILD))


def read(directory):
    reader = gguf.GGUFReader(directory / "model.gguf")
    tensors = {}
    for t in reader.tensors:
        data = (
            gguf.quants.dequantize(t.data, t.tensor_type) if t.tensor_type != gguf.GGMLQuantizationType.F32 else t.data
        )
        tensors[t.name] = (torch.from_numpy(np.array(data, dtype=np.float32)), t.tensor_type.name)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    return tensors, fields


def undo_interleave(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's LlamaModel.permute: per head, interleaved pairs back to rotate-half order."""
    shape = weight.shape
    return weight.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def expected(model, arch: str) -> dict[str, torch.Tensor]:
    """The converter's tensors for ``model``, built here from the model's modules (q/k still in HF order)."""
    core = model.model
    out = {"token_embd.weight": core.embed_tokens.weight, "output_norm.weight": core.norm.weight,
           "output.weight": model.lm_head.weight}  # fmt: skip
    for i, layer in enumerate(core.layers):
        attention, moe = layer.self_attn, layer.mlp.moe
        out[f"blk.{i}.attn_norm.weight"] = layer.input_layernorm.weight
        out[f"blk.{i}.ffn_norm.weight"] = layer.post_attention_layernorm.weight
        for ours, theirs in (
            ("q_proj", "attn_q"),
            ("k_proj", "attn_k"),
            ("v_proj", "attn_v"),
            ("o_proj", "attn_output"),
        ):
            out[f"blk.{i}.{theirs}.weight"] = getattr(attention, ours).weight
        if arch == "qwen2moe":  # Qwen2-MoE's q/k/v biases, zero for a bias-free source; the stand-in shared expert
            for ours, theirs in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
                out[f"blk.{i}.{theirs}.bias"] = torch.zeros(getattr(attention, ours).out_features)
            for name, shape in (("gate", (1, 32)), ("up", (1, 32)), ("down", (32, 1))):
                out[f"blk.{i}.ffn_{name}_shexp.weight"] = torch.zeros(shape)
            out[f"blk.{i}.ffn_gate_inp_shexp.weight"] = torch.ones(1, 32)
        if arch == "qwen3moe":
            out[f"blk.{i}.attn_q_norm.weight"] = attention.q_norm.weight
            out[f"blk.{i}.attn_k_norm.weight"] = attention.k_norm.weight
        out[f"blk.{i}.ffn_gate_inp.weight"] = moe.router.gate.weight  # [e, d]
        out[f"blk.{i}.ffn_gate_exps.weight"] = moe.experts.w_gate  # [e, h, d]
        out[f"blk.{i}.ffn_up_exps.weight"] = moe.experts.w_up  # [e, h, d]
        out[f"blk.{i}.ffn_down_exps.weight"] = moe.experts.w_down  # [e, d, h]
    return {name: tensor.detach().float() for name, tensor in out.items()}


@ARCHES
def test_every_tensor_reads_back_equal(arch, tmp_path):
    model = BUILD[arch]()
    tensors, fields = read(export_gguf(model, tmp_path / "gguf", arch=arch))
    want = expected(model, arch)
    assert set(tensors) == set(want)
    heads, kv_heads = SIZES["num_attention_heads"], SIZES["num_key_value_heads"]
    for name, (tensor, _) in tensors.items():
        if arch == "llama" and ".attn_q." in name:
            tensor = undo_interleave(tensor, heads)
        elif arch == "llama" and ".attn_k." in name:
            tensor = undo_interleave(tensor, kv_heads)
        assert torch.equal(tensor, want[name]), name
    assert fields["general.architecture"] == arch


@ARCHES
def test_the_key_metadata(arch, tmp_path):
    rope = {"rope_type": "default", "rope_theta": 5000.0}
    model = BUILD[arch]({"rms_norm_eps": 1e-5, "max_position_embeddings": 64, "rope_parameters": rope}, num_experts=3,
                        top_k=1)  # fmt: skip
    _, fields = read(export_gguf(model, tmp_path / "gguf", arch=arch))
    head_dim = 16 if arch == "qwen3moe" else 8
    want = {
        "block_count": 3,
        "context_length": 64,
        "embedding_length": 32,
        "feed_forward_length": 64,
        "attention.head_count": 4,
        "attention.head_count_kv": 2,
        "attention.key_length": head_dim,
        "attention.value_length": head_dim,
        "rope.freq_base": 5000.0,
        "expert_count": 3,
        "expert_used_count": 1,
    }
    want |= {"vocab_size": VOCAB, "rope.dimension_count": head_dim} if arch == "llama" else \
        {"expert_feed_forward_length": 64}  # fmt: skip
    if arch == "qwen2moe":
        want["expert_shared_feed_forward_length"] = 1
    assert {key: fields[f"{arch}.{key}"] for key in want} == want
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert (fields["general.file_type"], fields["general.quantization_version"]) == (0, 2)  # ALL_F32


def test_the_source_dtype_is_kept_where_the_converter_keeps_it(tmp_path):
    """bf16 weights stay BF16; norms, biases and routers are F32 as the converter writes them."""
    model = converted(tiny_llama().to(torch.bfloat16))
    tensors, fields = read(export_gguf(model, tmp_path / "gguf"))
    types = {name: kind for name, (_, kind) in tensors.items()}
    assert types["blk.0.ffn_gate_exps.weight"] == types["token_embd.weight"] == "BF16"
    assert types["blk.0.ffn_gate_inp.weight"] == types["blk.0.attn_norm.weight"] == "F32"
    assert fields["general.file_type"] == 32  # MOSTLY_BF16
    assert torch.equal(tensors["blk.1.ffn_down_exps.weight"][0], model.model.layers[1].mlp.moe.experts.w_down.float())


def rope_rotate_half(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """transformers' RoPE on x [n, positions, head_dim]: dims j and j + head_dim/2 rotate together."""
    d = x.shape[-1]
    angles = torch.arange(x.shape[1])[:, None] * theta ** (-torch.arange(0, d, 2) / d)  # [positions, d/2]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    return x * cos + torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1) * sin


def rope_interleaved(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """llama.cpp's llama RoPE (GGML_ROPE_TYPE_NORM): dims 2j and 2j+1 rotate together."""
    d = x.shape[-1]
    angles = torch.arange(x.shape[1])[:, None] * theta ** (-torch.arange(0, d, 2) / d)
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack([even * angles.cos() - odd * angles.sin(), even * angles.sin() + odd * angles.cos()], -1)
    return rotated.flatten(-2)


def test_the_q_k_permutation_makes_llama_cpp_rope_match_transformers(tmp_path):
    """Attention scores with the written q/k rows under llama.cpp's interleaved RoPE equal the model's own."""
    model = BUILD["llama"]()
    tensors, _ = read(export_gguf(model, tmp_path / "gguf"))
    x = torch.randn(6, 32)  # 6 positions
    attention = model.model.layers[0].self_attn
    with torch.no_grad():
        q_hf = attention.q_proj(x).T.reshape(4, 8, 6).transpose(1, 2)  # [heads, positions, head_dim]
        k_hf = attention.k_proj(x).T.reshape(2, 8, 6).transpose(1, 2).repeat_interleave(2, 0)
    q_cpp = (x @ tensors["blk.0.attn_q.weight"][0].T).T.reshape(4, 8, 6).transpose(1, 2)
    k_cpp = (x @ tensors["blk.0.attn_k.weight"][0].T).T.reshape(2, 8, 6).transpose(1, 2).repeat_interleave(2, 0)
    scores_hf = rope_rotate_half(q_hf) @ rope_rotate_half(k_hf).transpose(1, 2)
    scores_cpp = rope_interleaved(q_cpp) @ rope_interleaved(k_cpp).transpose(1, 2)
    torch.testing.assert_close(scores_cpp, scores_hf)


def test_the_tokenizer_is_written(tmp_path):
    model = with_tokenizer(BUILD["llama"](), tmp_path / "saved")
    _, fields = read(export_gguf(model, tmp_path / "gguf"))
    tokens = fields["tokenizer.ggml.tokens"]
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"], len(tokens)) == ("gpt2", "default", VOCAB)
    assert tokens[:4] == ["<pad>", "<unk>", "<s>", "</s>"] and tokens[-1] == f"[PAD{VOCAB - 1}]"
    assert fields["tokenizer.ggml.token_type"][:5] == [3, 3, 3, 3, 1] and fields["tokenizer.ggml.token_type"][-1] == 5
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (2, 3)
    assert "a t" in fields["tokenizer.ggml.merges"]


@pytest.mark.parametrize(("dense", "arch"), [("llama", "llama"), ("qwen2", "qwen2moe"), ("qwen3", "qwen3moe")])
def test_the_architecture_follows_the_source(dense, arch, tmp_path):
    source = {"llama": tiny_llama, "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SIZES)).eval(), "qwen3": tiny_qwen3}
    model = converted(source[dense](), router_renormalize=arch != "qwen2moe")
    out = upcycle.export(model, tmp_path / "gguf", format="gguf")
    assert read(out)[1]["general.architecture"] == arch


def test_a_missing_gguf_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match=re.escape("pip install 'upcycle[gguf]'")):
        export_gguf(BUILD["llama"](), tmp_path / "gguf")
    assert not (tmp_path / "gguf").exists()


NAMES = ("GGUF llama", "GGUF qwen2moe", "GGUF qwen3moe", "Mixtral", "Qwen2-MoE", "Qwen3-MoE")
REFUSALS = {
    "dense layers": ("qwen2moe", lambda: converted(tiny_llama(), layers=[1], router_renormalize=False),
                     r"decoder layers \[0, 2\] are dense, but llama.cpp's qwen2moe loader wants a router in every"),
    "qwen2moe renormalised": ("qwen2moe", lambda: converted(tiny_llama()),
                              "qwen2moe graph never renormalises .*router_renormalize=False"),
    "qwen3moe raw": ("qwen3moe", lambda: converted(tiny_qwen3(), router_renormalize=False),
                     "qwen3moe graph always renormalises .*router_renormalize=True"),
    "llama raw (as Mixtral)": ("llama", lambda: converted(tiny_llama(), router_renormalize=False), "renormalize=False"),
    "sliding window": ("llama", lambda: converted(MistralForCausalLM(MistralConfig(**SIZES, sliding_window=4)).eval()),
                       "sliding window, but llama.cpp's llama graph attends to the whole context"),
    "rope scaling": ("llama", lambda: converted(tiny_llama(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                          "rope_theta": 10000.0})),
                     "RoPE type 'linear'"),
    "qwen2moe head_dim": ("qwen2moe", lambda: converted(tiny_llama(head_dim=16), router_renormalize=False),
                          r"head_dim 16 × 4 heads ≠ hidden size 32"),
    "qwen3moe attention bias": ("qwen3moe", lambda: converted(tiny_qwen3(attention_bias=True)),
                                "qwen3moe loader has no tensor for"),
    "llama arch for qwen3": ("llama", lambda: converted(tiny_qwen3()), "q_norm / k_norm"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals(case, tmp_path):
    arch, build, match = REFUSALS[case]
    assert_refused(lambda model, out: export_gguf(model, out, arch=arch), build(), tmp_path, match, NAMES)


def test_an_unknown_arch_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"arch must be one of \('llama', 'qwen2moe', 'qwen3moe'\), got 'gpt2'"):
        export_gguf(BUILD["llama"](), tmp_path / "gguf", arch="gpt2")


@pytest.mark.slow
@ARCHES
def test_llama_cpp_computes_the_same_logits(arch, tmp_path):
    """Where llama-cpp-python is installed: llama.cpp loads the file and its logits and greedy tokens are ours."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = with_tokenizer(BUILD[arch](), tmp_path / "saved")
    out = export_gguf(model, tmp_path / "gguf", arch=arch)
    llm = llama_cpp.Llama(str(out / "model.gguf"), n_ctx=64, logits_all=True, verbose=False)
    ids = torch.randint(4, 34, (10,)).tolist()
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(theirs, ours, atol=1e-3, rtol=1e-3)
