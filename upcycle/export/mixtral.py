"""Export a converted Llama-family model as a Hugging Face Mixtral checkpoint (Jiang et al., "Mixtral of Experts",
arXiv 2401.04088): ``AutoModelForCausalLM.from_pretrained(directory)`` gives a ``MixtralForCausalLM`` with the same
logits.

Mixtral is Mistral with every FFN replaced by a sparse MoE block: router ``W_g [e, d]``, logits in fp32,
``p = softmax(W_g x)``, the top-k probabilities renormalised to sum to 1, and e SwiGLU experts
``w2 · (silu(w1 x) ⊙ w3 x)``. That is exactly an upcycle top-k MoE with ``renormalize=True``; everything else
(every layer an MoE, no biases, no shared expert, no capacity) is refused with the reason.

Tensor mapping for decoder layer i (our stacked experts are ``[e, out, in]``, the ``nn.Linear`` layout):

    ours                              fused (the default: transformers v5's native MixtralSparseMoeBlock parameters)
    router.gate.weight                model.layers.{i}.mlp.gate.weight                          [e, d]
    cat(w_gate, w_up, dim=1)          model.layers.{i}.mlp.experts.gate_up_proj                 [e, 2h, d]
    experts.w_down                    model.layers.{i}.mlp.experts.down_proj                    [e, d, h]

    ours                              legacy (``layout="legacy"``, the published Mixtral checkpoints)
    router.gate.weight   [e, d]       model.layers.{i}.block_sparse_moe.gate.weight            [e, d]
    experts.w_gate[j]    [h, d]       model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight  [h, d]
    experts.w_down[j]    [d, h]       model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight  [d, h]
    experts.w_up[j]      [h, d]       model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight  [h, d]

The fused layout is what transformers v5 holds in memory, so it loads without conversion (measured on an upcycled
SmolLM2-135M: 0.2 s, against 9.6 s for the legacy layout). v5 converts legacy checkpoints at load
(``conversion_mapping.py``, "mixtral"): it renames ``.block_sparse_moe.`` to ``.mlp.``, stacks ``w1`` and ``w3``
over experts and concatenates them along dim 1 (gate rows first; ``MixtralExperts`` splits them with
``chunk(2, dim=-1)``), and stacks ``w2``. The legacy layout is the one transformers v4, vLLM and llama.cpp's
``convert_hf_to_gguf.py`` read: its ``LlamaModel`` stacks ``block_sparse_moe.experts.{j}.w1/w2/w3`` into
``ffn_{gate,down,up}_exps`` and has no rule for ``gate_up_proj``.
So export with ``layout="legacy"`` for those tools, or write GGUF directly (``format="gguf"``).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain
from pathlib import Path

import torch
from torch import nn

from ..layers import MoE
from .formats import EXPORT_FORMATS
from .hf_moe_common import (
    Source,
    attention_windows,
    backbone_config,
    backbone_tensors,
    check_backbone,
    expert_slice,
    export_note,
    read_source,
    refuse,
    routed_shape,
    write_checkpoint,
)

TARGET = "Mixtral"
LAYOUTS = ("legacy", "fused")


@EXPORT_FORMATS.register(
    "mixtral",
    "transformers' Mixtral (MixtralForCausalLM): a converted Llama-family LM, every FFN an MoE, renormalised top-k",
)
def export_mixtral(model: nn.Module, directory: str | Path, layout: str = "fused", overwrite: bool = False) -> Path:
    """Write ``model`` (an ``upcycle.convert``-ed Llama / Mistral / Phi-3 causal LM) as a Mixtral checkpoint."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    source = read_source(model, TARGET, "mixtral")
    config = mixtral_config(source)  # checks everything before anything is written
    tensors = chain(backbone_tensors(source), *(moe_tensors(i, m, layout) for i, m in sorted(source.moe.items())))
    note = export_note(source, "mixtral", layout=layout)
    return write_checkpoint(directory, config, tensors, source, note, overwrite)


def check_mixtral(source: Source) -> None:
    """What Mixtral cannot express beyond the routed-expert checks: dense layers, shared experts, biases."""
    if source.dense_layers:
        raise refuse(
            TARGET,
            f"decoder layers {source.dense_layers} are still dense FFNs, but every Mixtral layer is a sparse MoE "
            "block; convert with layers='all', or use export_qwen2_moe, which keeps dense layers (mlp_only_layers)",
        )
    shared = sorted(i for i, m in source.moe.items() if m.shared_expert is not None)
    if shared:
        raise refuse(TARGET, f"layers {shared} have a shared expert, which Mixtral has not; use export_qwen2_moe")
    check_backbone(source, TARGET, biased=())


def mixtral_config(source: Source):
    from transformers import MixtralConfig

    check_mixtral(source)
    shape = routed_shape(source, TARGET)
    if not shape.renormalize:
        raise refuse(
            TARGET,
            "the router does not renormalise the top-k weights (renormalize=False), but Mixtral always divides "
            "them by their sum; convert with router_renormalize=True, or use export_qwen2_moe (norm_topk_prob=False)",
        )
    return MixtralConfig(
        **backbone_config(source),
        intermediate_size=shape.d_hidden,  # Mixtral's intermediate_size is each expert's width
        num_local_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
        sliding_window=uniform_window(source),
        router_jitter_noise=0.0,  # our router noise is training-only logit noise; exported for inference only
        architectures=["MixtralForCausalLM"],
    )


def uniform_window(source: Source) -> int | None:
    """Mixtral has one ``sliding_window`` for all layers (as Mistral); per-layer windows (Qwen2) are refused."""
    window, layer_types = attention_windows(source.config)
    if window is not None and len(set(layer_types)) > 1:
        raise refuse(TARGET, f"the source mixes sliding and full attention layers ({layer_types}); Mixtral cannot")
    return window


def moe_tensors(index: int, moe: MoE, layout: str) -> Iterator[tuple[str, torch.Tensor]]:
    experts = moe.experts
    if layout == "fused":
        prefix = f"model.layers.{index}.mlp."
        yield prefix + "gate.weight", moe.router.gate.weight
        # gate rows first: MixtralExperts computes act(gate) * up from gate_up_proj(x).chunk(2, dim=-1)
        yield prefix + "experts.gate_up_proj", torch.cat([experts.w_gate, experts.w_up], dim=1)
        yield prefix + "experts.down_proj", experts.w_down
        return
    prefix = f"model.layers.{index}.block_sparse_moe."
    yield prefix + "gate.weight", moe.router.gate.weight
    for j in range(experts.num_experts):
        yield f"{prefix}experts.{j}.w1.weight", expert_slice(experts.w_gate, j)
        yield f"{prefix}experts.{j}.w2.weight", expert_slice(experts.w_down, j)
        yield f"{prefix}experts.{j}.w3.weight", expert_slice(experts.w_up, j)
