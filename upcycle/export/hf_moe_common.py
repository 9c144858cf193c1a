"""What the Hugging Face MoE exporters (Mixtral, Qwen2-MoE, Qwen3-MoE) share: reading a converted Llama-family
model, the checks every target needs, the backbone tensors and config fields, and the atomic checkpoint writer.

The backbone is copied unchanged: Llama, Mistral, Qwen2, Qwen3 and their MoE twins name their embeddings,
attention, RMSNorms and LM head identically (``model.embed_tokens.weight [V, d]``,
``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight``, ``model.layers.{i}.{input,post_attention}_layernorm.weight
[d]``, ``model.norm.weight [d]``, ``lm_head.weight [V, d]``) and compute them identically (pre-norm residual
blocks, RoPE from ``rope_parameters``, grouped-query attention scaled by ``head_dim**-0.5``). Qwen3 and Qwen3-MoE
also normalise each query and key head (``self_attn.{q,k}_norm.weight [head_dim]``), which Mixtral and Qwen2-MoE
cannot express. Only ``mlp`` differs, and each exporter writes that part itself. A family that fuses projections the
twins keep apart (Phi-3's ``qkv_proj``) hands them over split, through its adapter's ``twin_tensors``.

``lm_head.weight`` is written even when it is tied to the embeddings: llama.cpp's converter turns it into the
``output`` tensor that its Qwen2-MoE loader requires, and transformers ties it again on load
(``tie_word_embeddings`` keeps what the weights do). See ``loader_compat`` for the fields older loaders read.

Every check runs before anything is written, so a refused export leaves no directory behind.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import get_adapter
from ..adapters.hf_common import rope_parameters
from ..atomic import atomic_directory
from ..layers import MoE, TopKRouter
from ..layers.activations import from_hf
from ..record import ConversionRecord, record_of
from .loader_compat import add_loader_fields, portable_tokenizer_config
from .saving import DEFAULT_SHARD_BYTES, check_exportable
from .shards import ShardWriter
from .tokenizer_files import copy_tokenizer_files

EXPORT_NOTE = "upcycle_export.json"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")

Tensors = Iterable[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class Source:
    """A converted causal LM as the exporters read it."""

    model: nn.Module  # e.g. LlamaForCausalLM with MoEFFN modules in place of some ``mlp``s
    record: ConversionRecord  # upcycle.record_of(model)
    moe: dict[int, MoE]  # decoder layer index -> its MoE layer; absent indices are still dense MLPs

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    @property
    def dense_layers(self) -> list[int]:
        return [i for i in range(len(self.layers)) if i not in self.moe]


@dataclass(frozen=True)
class RoutedShape:
    """The routed-expert settings a target config holds once for the whole model."""

    num_experts: int
    top_k: int
    d_hidden: int  # each expert's hidden width (intermediate size)
    renormalize: bool


def refuse(target: str, reason: str) -> ValueError:
    return ValueError(f"cannot export to {target}: {reason}")


def read_source(model: nn.Module, target: str, format: str) -> Source:
    """The converted model's record and MoE layers, once its adapter confirmed ``format`` stores it exactly."""
    check_exportable(model, format)
    record = record_of(model)
    if record is None or record.adapter is None:
        raise refuse(target, "the model has no conversion record; export a model returned by upcycle.convert")
    if not record.layers:
        raise refuse(target, "the model has no MoE layer (the layer selection of upcycle.convert matched none)")
    moe = {}
    for name, spec in record.layers.items():
        module = model.get_submodule(name)
        moe[spec["index"]] = getattr(module, "moe", module)  # MoEFFN wraps the MoE
    return Source(model, record, moe)


def routed_problem(moe: MoE, target: str) -> str | None:
    """Why one MoE layer's router or experts cannot be written as ``target``'s top-k SwiGLU experts, or None."""
    router, experts = moe.router, moe.experts
    if not isinstance(router, TopKRouter):
        return (
            f"its router is {type(router).__name__}, not token-choice top-k; {target} sends each token to its "
            "top-k experts by softmax probability (convert with router type 'topk')"
        )
    if router.unit_weights:
        return (
            f"its router gives every chosen expert weight 1 (unit_weights, as neuron_split / MoEfication do); "
            f"{target} weights experts by their softmax probabilities (convert with sparse_upcycling)"
        )
    if router.capacity_factor is not None:
        return (
            f"its router drops tokens above a per-expert capacity (capacity_factor={router.capacity_factor}); "
            f"{target} has no capacity limit (convert with router_capacity_factor=None)"
        )
    if router.gate.bias is not None:
        return f"its router has a bias; {target}'s router is a bias-free linear layer (remove router.gate.bias)"
    return experts_problem(experts, target)


def experts_problem(experts, target: str) -> str | None:
    """Why stacked experts cannot be written as ``target``'s bias-free SiLU-gated experts, or None."""
    if not (experts.gated and experts.activation == "silu"):
        kind = f"{'gated' if experts.gated else 'plain'} {experts.activation}"
        return f"its experts are {kind} FFNs; {target}'s experts are SiLU-gated: down(silu(gate·x) ⊙ up·x)"
    biases = [n for n in ("b_up", "b_gate", "b_down") if getattr(experts, n) is not None]
    if biases:
        return (
            f"its experts have biases ({', '.join(biases)}, from a source with mlp_bias=True); {target}'s expert "
            "projections have none"
        )
    if experts.shared_bias is not None:
        return f"its experts add a shared output bias (shared_bias); {target} has no such bias"
    if experts.norm_weight is not None:
        return f"its experts normalise their hidden units (hidden LayerNorm); {target}'s experts have no norm"
    return None


def routed_shape(source: Source, target: str) -> RoutedShape:
    """Check every MoE layer's routed part, and that they agree on what the target config holds only once."""
    for index, moe in sorted(source.moe.items()):
        problem = routed_problem(moe, target)
        if problem:
            raise refuse(target, f"layer {index}: {problem}")
    values = {
        "num_experts": {i: m.experts.num_experts for i, m in source.moe.items()},
        "top_k": {i: m.router.top_k for i, m in source.moe.items()},
        "d_hidden": {i: m.experts.d_hidden for i, m in source.moe.items()},
        "renormalize": {i: m.router.renormalize for i, m in source.moe.items()},
    }
    return RoutedShape(**{field: single_value(target, field, per_layer) for field, per_layer in values.items()})


def single_value(target: str, what: str, per_layer: dict[int, Any]) -> Any:
    distinct = set(per_layer.values())
    if len(distinct) != 1:
        raise refuse(target, f"MoE layers differ in {what} ({per_layer}); {target}'s config holds one value")
    return distinct.pop()


def check_backbone(source: Source, target: str, biased: tuple[str, ...], qk_norm: bool = False) -> None:
    """Refuse a non-SiLU source, attention biases the target has no tensor for (``biased``: those it has) and
    per-head q/k norms the target has not (``qk_norm``: whether it has them, and so needs them)."""
    if from_hf(source.config.hidden_act) != "silu":
        raise refuse(
            target,
            f"the source activation is {source.config.hidden_act!r}, but {target}'s MLPs and experts compute "
            "silu(gate·x) ⊙ up·x; only SiLU-gated sources (hidden_act='silu') can be exported",
        )
    attention = source.layers[0].self_attn  # every layer is built from the same config
    # its own projections, fused (Phi-3's qkv_proj) or not, in definition order
    linears = [(n, m) for n, m in attention.named_children() if isinstance(m, nn.Linear)]
    extra = [n for n, m in linears if m.bias is not None and n not in biased]
    if extra:
        allowed = f"only {', '.join(biased)} have biases" if biased else "no projection has a bias"
        raise refuse(
            target,
            f"the source attention projections {extra} have biases (e.g. Llama attention_bias=True), but in "
            f"{target}'s attention {allowed}",
        )
    has_qk_norm = hasattr(attention, "q_norm")
    if has_qk_norm and not qk_norm:
        raise refuse(
            target,
            f"the source attention normalises every query and key head (q_norm / k_norm, as Qwen3's does), which "
            f"{target}'s attention has not; export a Qwen3 source with format 'qwen3_moe'",
        )
    if qk_norm and not has_qk_norm:
        raise refuse(
            target,
            f"{target}'s attention normalises every query and key head (q_norm / k_norm), but the source's has no "
            "such norms (only Qwen3 sources do); export with format 'mixtral' or 'qwen2_moe'",
        )


def attention_windows(config: Any) -> tuple[int | None, list[str]]:
    """(sliding window, per-layer attention type) of the dense source.

    Llama: no window. Mistral: ``sliding_window`` (when set) on every layer. Qwen2: ``layer_types`` says which.
    """
    count = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        layer_types = ["sliding_attention" if window else "full_attention"] * count
    return (window if "sliding_attention" in layer_types else None), list(layer_types)


def is_tied(model: nn.Module) -> bool:
    return model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def backbone_config(source: Source) -> dict[str, Any]:
    """Config fields Llama and the MoE targets share (same names, same meaning)."""
    c = source.config
    dtype = next(source.model.parameters()).dtype
    return {
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
        "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
        "rope_parameters": rope_parameters(c), "hidden_act": "silu",
        "attention_dropout": getattr(c, "attention_dropout", 0.0), "initializer_range": c.initializer_range,
        "tie_word_embeddings": is_tied(source.model),  # what the weights do, whatever the flag says
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
        "dtype": str(dtype).removeprefix("torch."),
    }  # fmt: skip


def backbone_tensors(source: Source, zero_qkv_bias: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Everything but the MLPs, under the shared names; the LM head always, a copy where it is tied.

    ``zero_qkv_bias``: add zero q/k/v biases where the source has none (Qwen2-family attention has them).
    """
    tied = is_tied(source.model)
    for name, tensor in get_adapter(source.record.adapter).twin_tensors(source.model):
        if ".mlp." in name:
            continue
        # safetensors refuses two names for one storage, so the tied head is written as its own copy
        yield name, tensor.detach().clone() if tied and name == "lm_head.weight" else tensor
    if zero_qkv_bias:
        for i, layer in enumerate(source.layers):
            for projection in ATTENTION[:3]:
                linear = getattr(layer.self_attn, projection)
                if linear.bias is None:
                    zeros = torch.zeros(linear.out_features, dtype=linear.weight.dtype)
                    yield f"model.layers.{i}.self_attn.{projection}.bias", zeros


def export_note(source: Source, target: str, **extra: Any) -> dict:
    """Provenance written next to the checkpoint (transformers ignores it)."""
    return {
        "format": target,
        **extra,
        "source": {
            "adapter": source.record.adapter,
            "class": source.record.source.get("class"),
            "model_type": source.config.model_type,
        },
        "moe_layers": sorted(source.moe),
        "dense_layers": source.dense_layers,
        "convert": source.record.convert,
    }


def write_checkpoint(directory: str | Path, config: Any, tensors: Tensors, source: Source, note: dict,
                     overwrite: bool, aliases: dict[str, Any] | None = None) -> Path:  # fmt: skip
    """config.json (+ generation_config.json), safetensors shards and the export note, renamed into place at once.

    ``aliases``: extra config.json fields for older loaders (``loader_compat.add_loader_fields``)."""
    directory = Path(directory)
    with atomic_directory(directory, overwrite=overwrite) as staging:
        with ShardWriter(staging, DEFAULT_SHARD_BYTES) as writer:
            for name, tensor in tensors:
                writer.add(name, tensor)
        config.save_pretrained(staging)
        add_loader_fields(staging, config, aliases)
        generation = getattr(source.model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(staging)  # same bos / eos / pad for generate()
        (staging / EXPORT_NOTE).write_text(json.dumps(note, indent=2, default=str) + "\n")
        copy_tokenizer_files(source.model, staging)
        portable_tokenizer_config(staging)
    return directory


def expert_slice(stacked: torch.Tensor, j: int) -> torch.Tensor:
    """Expert j's matrix as its own tensor: safetensors refuses tensors that share storage with another."""
    return stacked[j].detach().clone()


def routed_tensors(index: int, moe: MoE) -> Iterator[tuple[str, torch.Tensor]]:
    """Router and experts under the per-expert names of the published Qwen2-MoE / Qwen3-MoE checkpoints."""
    prefix, experts = f"model.layers.{index}.mlp.", moe.experts
    yield prefix + "gate.weight", moe.router.gate.weight  # [e, d]
    for j in range(experts.num_experts):
        yield f"{prefix}experts.{j}.gate_proj.weight", expert_slice(experts.w_gate, j)  # [h, d]
        yield f"{prefix}experts.{j}.up_proj.weight", expert_slice(experts.w_up, j)  # [h, d]
        yield f"{prefix}experts.{j}.down_proj.weight", expert_slice(experts.w_down, j)  # [d, h]


def dense_width(source: Source, target: str) -> int:
    """The dense MLP width of the unconverted layers (the source's, if every layer is an MoE)."""
    for i in source.dense_layers:
        mlp = source.layers[i].mlp
        if any(getattr(mlp, p).bias is not None for p in ("gate_proj", "up_proj", "down_proj")):
            raise refuse(target, f"the dense MLP of layer {i} has biases (mlp_bias=True); {target}'s MLPs have none")
    widths = {i: source.layers[i].mlp.up_proj.out_features for i in source.dense_layers}
    return single_value(target, "dense MLP width", widths) if widths else source.config.intermediate_size


def dense_tensors(source: Source, index: int) -> Iterator[tuple[str, torch.Tensor]]:
    """A layer left dense: Llama's MLP has the same three projections as the Qwen MoE models' dense MLP."""
    mlp = source.layers[index].mlp
    for name in ("gate_proj", "up_proj", "down_proj"):
        yield f"model.layers.{index}.mlp.{name}.weight", getattr(mlp, name).weight
