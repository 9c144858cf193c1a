"""Export a converted Qwen3 model as a Hugging Face Qwen3-MoE checkpoint (Qwen3 Technical Report,
arXiv 2505.09388): ``AutoModelForCausalLM.from_pretrained(directory)`` gives a ``Qwen3MoeForCausalLM`` with the same
logits.

Qwen3-MoE is Qwen3 with sparse blocks, read from transformers' ``modeling_qwen3_moe.py``:

- attention as Qwen3's: q/k/v/o projections (all four biased iff ``attention_bias``), an RMSNorm over each query
  and key head (``q_norm`` / ``k_norm [head_dim]``) before RoPE, ``head_dim`` free of ``hidden_size``;
- ``Qwen3MoeTopKRouter``: ``p = softmax(W_g x)`` in fp32, the top-k probabilities divided by their sum iff
  ``norm_topk_prob``; ``Qwen3MoeExperts``: ``down · (silu(gate x) ⊙ up x)`` without biases; no shared expert;
- layer i is sparse iff ``i not in mlp_only_layers`` and ``(i + 1) % decoder_sparse_step == 0``; we write
  ``decoder_sparse_step = 1`` and list our dense layers in ``mlp_only_layers`` (a SwiGLU MLP of width
  ``intermediate_size``, the same three projections as Qwen3's MLP);
- one ``sliding_window`` for every layer when ``use_sliding_window`` (Qwen3's per-layer ``layer_types`` have no
  counterpart), so a source that mixes sliding and full attention layers is refused.

So an upcycle top-k MoE over a Qwen3 source, renormalised or not, with any layers left dense, is stored exactly;
sources without q/k norms (Llama, Mistral, Qwen2) are refused, as Mixtral and Qwen2-MoE refuse Qwen3 sources.

Tensor mapping for decoder layer i (per-expert names, the layout of the published Qwen3-MoE checkpoints, which
transformers v5 stacks at load into ``mlp.experts.gate_up_proj [e, 2h, d]`` / ``mlp.experts.down_proj [e, d, h]``
through the Qwen2-MoE conversion pattern, and which transformers 4.x, vLLM and llama.cpp's converter read as is):

    ours (MoE layer)                   Qwen3-MoE
    router.gate.weight     [e, d]      model.layers.{i}.mlp.gate.weight                          [e, d]
    experts.w_gate[j]      [h, d]      model.layers.{i}.mlp.experts.{j}.gate_proj.weight         [h, d]
    experts.w_up[j]        [h, d]      model.layers.{i}.mlp.experts.{j}.up_proj.weight           [h, d]
    experts.w_down[j]      [d, h]      model.layers.{i}.mlp.experts.{j}.down_proj.weight         [d, h]
    dense Qwen3 MLP                    model.layers.{i}.mlp.{gate,up,down}_proj.weight  (i in mlp_only_layers)
"""

from __future__ import annotations

from itertools import chain
from pathlib import Path

from torch import nn

from .formats import EXPORT_FORMATS
from .hf_moe_common import (
    ATTENTION,
    Source,
    attention_windows,
    backbone_config,
    backbone_tensors,
    check_backbone,
    dense_tensors,
    dense_width,
    export_note,
    read_source,
    refuse,
    routed_shape,
    routed_tensors,
    write_checkpoint,
)

TARGET = "Qwen3-MoE"


@EXPORT_FORMATS.register(
    "qwen3_moe", "transformers' Qwen3-MoE: a converted Qwen3 LM (q/k norms), raw or renormalised top-k, dense layers"
)
def export_qwen3_moe(model: nn.Module, directory: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` (an ``upcycle.convert``-ed Qwen3 causal LM) as a Qwen3-MoE checkpoint."""
    source = read_source(model, TARGET, "qwen3_moe")
    config = qwen3_moe_config(source)  # checks everything before anything is written
    tensors = chain(
        backbone_tensors(source),
        *(routed_tensors(i, m) for i, m in sorted(source.moe.items())),
        *(dense_tensors(source, i) for i in source.dense_layers),
    )
    aliases = {"num_experts": config.num_experts}  # v5 saves it as num_local_experts; transformers 4.x reads this
    note = export_note(source, "qwen3_moe")
    return write_checkpoint(directory, config, tensors, source, note, overwrite, aliases)


def qwen3_moe_config(source: Source):
    from transformers import Qwen3MoeConfig

    attention_bias = bool(getattr(source.config, "attention_bias", False))
    check_backbone(source, TARGET, biased=ATTENTION if attention_bias else (), qk_norm=True)
    shared = sorted(i for i, m in source.moe.items() if m.shared_expert is not None)
    if shared:
        raise refuse(TARGET, f"layers {shared} have a shared expert, which Qwen3-MoE has not")
    shape = routed_shape(source, TARGET)
    window = uniform_window(source)
    return Qwen3MoeConfig(
        **backbone_config(source),
        intermediate_size=dense_width(source, TARGET),
        moe_intermediate_size=shape.d_hidden,
        num_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
        norm_topk_prob=shape.renormalize,
        mlp_only_layers=source.dense_layers,
        decoder_sparse_step=1,  # with mlp_only_layers, the only rule for which layers are sparse
        attention_bias=attention_bias,
        use_sliding_window=window is not None,
        sliding_window=window,
        architectures=["Qwen3MoeForCausalLM"],
    )


def uniform_window(source: Source) -> int | None:
    """Qwen3-MoE applies ``sliding_window`` to every layer; a source mixing window and full layers is refused."""
    window, layer_types = attention_windows(source.config)
    if window is not None and len(set(layer_types)) > 1:
        raise refuse(
            TARGET,
            f"the source mixes sliding and full attention layers ({layer_types}); Qwen3-MoE applies one "
            "sliding_window to every layer",
        )
    return window
