"""Export a converted LM as a GGUF file for llama.cpp (GGUF: the ggml project's single-file model format, header +
key/value metadata + tensors), written with the ``gguf`` package and holding the tensors and metadata llama.cpp's
own ``convert_hf_to_gguf.py`` writes from our Hugging Face export of the same model:

    arch        sources                 HF twin      converter class   routing llama.cpp hard-codes
    llama       Llama, Mistral          Mixtral      LlamaModel        softmax, top-k renormalised
    qwen2moe    Llama, Mistral, Qwen2   Qwen2-MoE    Qwen2MoeModel     softmax, top-k raw; sigmoid-gated shared expert
    qwen3moe    Qwen3                   Qwen3-MoE    Qwen3MoeModel     softmax, top-k renormalised; q/k head norms

The architecture follows the source (``qwen3moe`` for Qwen3, ``qwen2moe`` for Qwen2, else ``llama``) unless
``arch`` names one. Every check of the HF twin applies, and what llama.cpp's graph cannot express on top of it is
refused: dense layers (its loaders want a router in every block), a renormalisation other than the one hard-coded
above (no GGUF key switches it for these architectures), sliding windows (these graphs attend to the whole
context), RoPE scaling other than the default, and for ``qwen2moe`` a ``head_dim`` other than ``hidden / heads``.

Tensors (numpy shapes; GGUF stores the reversed order, ``ne``), as the converter produces them:

    model.embed_tokens / lm_head / model.norm   token_embd [V, d] / output [V, d] (even when tied) / output_norm [d]
    self_attn.{q,k,v,o}_proj (+ q/k/v bias)     blk.i.attn_{q,k,v,output}; for ``llama`` the q and k rows are
                                                permuted per head from rotate-half to llama.cpp's interleaved RoPE:
                                                W.reshape(n, 2, r / 2, d).swapaxes(1, 2).reshape(r, d), n the heads
                                                (n_kv for k), r = n · head_dim
    self_attn.{q,k}_norm (qwen3moe)             blk.i.attn_{q,k}_norm [head_dim]
    router.gate.weight                          blk.i.ffn_gate_inp [e, d]
    experts.w_gate / w_up / w_down              blk.i.ffn_gate_exps [e, h, d] / ffn_up_exps [e, h, d] /
                                                ffn_down_exps [e, d, h]: every expert's matrix stacked on dim 0
    shared expert (qwen2moe)                    blk.i.ffn_{gate,up,down}_shexp, ffn_gate_inp_shexp [1, d] (the
                                                stand-in of the Qwen2-MoE export where ours has none)

Types as the converter's: norms, 1-D tensors, biases and routers in F32, the rest in the model's dtype (F32, F16 or
BF16; file_type says which). Metadata: the converter's keys for the HF config (block_count, context_length,
embedding_length, feed_forward_length, head counts, key/value length, rope freq base, RMS eps, expert count and
used count; llama: vocab_size, rope dimension count; qwen: expert feed-forward lengths), and the tokenizer where
the model was read from a folder with a byte-level BPE ``tokenizer.json`` (``gguf_vocab``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._optional import require
from ..atomic import atomic_directory
from .formats import EXPORT_FORMATS
from .gguf_vocab import add_vocab
from .hf_moe_common import (
    EXPORT_NOTE,
    Source,
    attention_windows,
    backbone_tensors,
    export_note,
    read_source,
    refuse,
)
from .mixtral import mixtral_config
from .qwen2_moe import qwen2_moe_config, shared_tensors
from .qwen3_moe import qwen3_moe_config

FILE = "model.gguf"
ARCHES = ("llama", "qwen2moe", "qwen3moe")
TWIN = {"llama": "mixtral", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}  # the HF export it mirrors
RENORMALISES = {"llama": True, "qwen2moe": False, "qwen3moe": True}  # build_moe_ffn(norm_w) in llama.cpp's graphs
LLAMA_EXPERTS = {"w_gate": "w1", "w_down": "w2", "w_up": "w3"}  # LlamaModel stacks block_sparse_moe experts
QWEN_EXPERTS = {"w_gate": "gate_proj", "w_down": "down_proj", "w_up": "up_proj"}


@EXPORT_FORMATS.register(
    "gguf", "llama.cpp's GGUF (model.gguf): llama (Mixtral), qwen2moe or qwen3moe, as its converter"
)
def export_gguf(model: nn.Module, directory: str | Path, arch: str | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` (an ``upcycle.convert``-ed Llama / Mistral / Qwen2 / Qwen3 LM) as ``directory/model.gguf``."""
    gguf = require("gguf", "gguf", "writing GGUF files")
    arch = arch or default_arch(model)
    if arch not in ARCHES:
        raise ValueError(f"arch must be one of {ARCHES}, got {arch!r}")
    source = read_source(model, f"GGUF {arch}", TWIN[arch])
    config = twin_config(source, arch)  # the HF twin's checks and config, as the converter would read it
    check_llama_cpp(source, arch, config)
    directory = Path(directory)
    with atomic_directory(directory, overwrite=overwrite) as staging:
        writer = gguf.GGUFWriter(staging / FILE, arch)
        qtype = add_metadata(gguf, writer, arch, config.to_dict(), next(model.parameters()).dtype)
        vocab = add_vocab(gguf, writer, source.record.files, config.vocab_size)
        for name, tensor in gguf_tensors(gguf, source, arch, config):
            add_tensor(gguf, writer, name, tensor, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        note = export_note(source, "gguf", arch=arch, vocab=vocab)
        (staging / EXPORT_NOTE).write_text(json.dumps(note, indent=2, default=str) + "\n")
    return directory


def default_arch(model: nn.Module) -> str:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers and hasattr(layers[0].self_attn, "q_norm"):
        return "qwen3moe"
    return "qwen2moe" if getattr(model.config, "model_type", None) == "qwen2" else "llama"


def twin_config(source: Source, arch: str):
    return {"llama": mixtral_config, "qwen2moe": qwen2_moe_config, "qwen3moe": qwen3_moe_config}[arch](source)


def check_llama_cpp(source: Source, arch: str, config: Any) -> None:
    """What llama.cpp's graph for ``arch`` cannot express beyond the HF twin's checks."""
    target = f"GGUF {arch}"
    if source.dense_layers:
        raise refuse(target, f"decoder layers {source.dense_layers} are dense, but llama.cpp's {arch} loader wants "
                             "a router in every block; convert with layers='all'")  # fmt: skip
    renormalize = next(iter(source.moe.values())).router.renormalize  # one value: the twin's config checked it
    if renormalize != RENORMALISES[arch]:
        raise refuse(target, f"llama.cpp's {arch} graph {'always' if RENORMALISES[arch] else 'never'} renormalises "
                             f"the top-k weights; convert with router_renormalize={RENORMALISES[arch]}")  # fmt: skip
    if attention_windows(source.config)[0] is not None:
        raise refuse(target, f"the source attends through a sliding window, but llama.cpp's {arch} graph attends to "
                             "the whole context")  # fmt: skip
    rope = config.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise refuse(target, f"RoPE type {rope['rope_type']!r}: the GGUF writer covers the default RoPE; convert "
                             "the Hugging Face export with llama.cpp's convert_hf_to_gguf.py")  # fmt: skip
    if arch == "qwen2moe" and config.head_dim * config.num_attention_heads != config.hidden_size:
        raise refuse(target, f"head_dim {config.head_dim} × {config.num_attention_heads} heads ≠ hidden size "
                             f"{config.hidden_size}, which llama.cpp's qwen2moe loader assumes")  # fmt: skip
    if arch == "qwen3moe" and config.attention_bias:
        raise refuse(target, "the source attention has biases, which llama.cpp's qwen3moe loader has no tensor for")


def add_metadata(gguf: Any, writer: Any, arch: str, hparams: dict, dtype: torch.dtype) -> Any:
    """The converter's keys (TextModel.set_gguf_parameters and the arch's own); the tensor type for weights."""
    qtype, ftype = {
        torch.float32: (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
        torch.float16: (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
        torch.bfloat16: (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    }[dtype]
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(hparams.get("_name_or_path") or "upcycle MoE")
    writer.add_block_count(hparams["num_hidden_layers"])
    writer.add_context_length(hparams["max_position_embeddings"])
    writer.add_embedding_length(hparams["hidden_size"])
    writer.add_feed_forward_length(hparams["intermediate_size"])  # llama: each expert's width (Mixtral's meaning)
    writer.add_head_count(hparams["num_attention_heads"])
    writer.add_head_count_kv(hparams["num_key_value_heads"])
    writer.add_rope_freq_base(hparams["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(hparams["rms_norm_eps"])
    writer.add_expert_count(hparams.get("num_local_experts") or hparams["num_experts"])
    writer.add_expert_used_count(hparams["num_experts_per_tok"])
    writer.add_key_length(hparams["head_dim"])
    writer.add_value_length(hparams["head_dim"])
    writer.add_file_type(ftype)
    if arch == "llama":
        writer.add_vocab_size(hparams["vocab_size"])
        writer.add_rope_dimension_count(hparams["head_dim"])
    else:
        writer.add_expert_feed_forward_length(hparams["moe_intermediate_size"])
        if "shared_expert_intermediate_size" in hparams:
            writer.add_expert_shared_feed_forward_length(hparams["shared_expert_intermediate_size"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return qtype


def gguf_tensors(gguf: Any, source: Source, arch: str, config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) for every tensor, in the converter's names, stacking and permutation."""
    code = next(code for code, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.get_tensor_name_map(code, config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for name, tensor in backbone_tensors(source, zero_qkv_bias=arch == "qwen2moe"):
        if arch == "llama" and ".q_proj." in name:
            tensor = rope_interleave(tensor, heads)
        elif arch == "llama" and ".k_proj." in name:
            tensor = rope_interleave(tensor, kv_heads)
        yield names.get_name(name, try_suffixes=(".weight", ".bias")), tensor
    for i, moe in sorted(source.moe.items()):
        yield f"blk.{i}.ffn_gate_inp.weight", moe.router.gate.weight  # [e, d]
        for ours, theirs in (LLAMA_EXPERTS if arch == "llama" else QWEN_EXPERTS).items():
            merged = f"layers.{i}.feed_forward.experts.{theirs}.weight" if arch == "llama" else \
                f"model.layers.{i}.mlp.experts.{theirs}.weight"  # fmt: skip
            yield names.get_name(merged, try_suffixes=(".weight",)), getattr(moe.experts, ours)  # [e, h, d] / [e, d, h]
        if arch == "qwen2moe":
            for name, tensor in shared_tensors(f"model.layers.{i}.mlp.", moe, config.shared_expert_intermediate_size):
                yield names.get_name(name, try_suffixes=(".weight",)), tensor


def rope_interleave(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """LlamaModel.permute: each head's rows from rotate-half order (x_0..x_{r/2-1} pair with x_{r/2}..) to
    interleaved pairs (x_0, x_1), the order llama.cpp's llama RoPE rotates. weight [heads · head_dim, ...]."""
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def add_tensor(gguf: Any, writer: Any, name: str, tensor: torch.Tensor, qtype: Any) -> None:
    """In F32 where the converter keeps F32 (1-D, norms, biases, routers), else in the model's type."""
    data = tensor.detach().to(torch.float32).cpu().contiguous().numpy()
    keep_f32 = data.ndim <= 1 or name.endswith(("_norm.weight", ".bias")) or ".ffn_gate_inp" in name
    target = gguf.GGMLQuantizationType.F32 if keep_f32 else qtype
    writer.add_tensor(name, np.ascontiguousarray(gguf.quants.quantize(data, target)), raw_dtype=target)
