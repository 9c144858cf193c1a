"""Hugging Face Phi-3 (Abdin et al., arXiv 2404.14219) and models with its fused MLP: ``layers[i].mlp`` with
``gate_up_proj`` (Linear ``[2h, d]``, the gate half first) and ``down_proj``:
``down(act(gate) * up)`` where ``gate, up = gate_up_proj(x).chunk(2)``. The fused qkv projection stays Phi-3's own
in the converted model; the Mixtral export splits it (:meth:`HFPhi3Adapter.twin_tensors`).

Read from transformers' ``modeling_phi3.py``: apart from the fused projections, a Phi-3 block computes what a Mistral
block does (pre-norm RMSNorms ``w · x / rms(x)``, GQA scaled by ``head_dim**-0.5``, one ``sliding_window`` on every
layer when set, no biases, an untied or tied head); its residual and embedding dropouts act in training only. Its RoPE
differs where Mixtral's cannot follow: ``partial_rotary_factor < 1`` rotates only the first dimensions of each head
(Mixtral rotates all), and ``longrope`` (``su``) switches to the long factors past
``original_max_position_embeddings``, where Phi-3's ``generate`` recomputes the whole KV cache and Mixtral's keeps
the keys rotated with the short ones. Both are refused for Mixtral and left to the generic class.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .base import register_adapter
from .hf_common import HFMLPAdapter, rope_parameters

QKV = "self_attn.qkv_proj.weight"


@register_adapter
class HFPhi3Adapter(HFMLPAdapter):
    name = "hf_phi3"
    family = "Hugging Face Phi-3 (layers[i].mlp: fused gate_up_proj, down_proj)"
    task = "causal_lm"
    activation_attribute = "activation_fn"
    layers_path, ffn_name, fused_gate_up, down = "layers", "mlp", "gate_up_proj", "down_proj"
    export_formats = ("mixtral",)
    export_model_types = ("phi3",)  # others with a fused gate_up_proj have their own blocks

    def export_refusal(self, model: nn.Module, target: str) -> str | None:
        refusal = super().export_refusal(model, target)
        if refusal is not None or target == self.generic_format:  # the generic class keeps Phi-3's blocks
            return refusal
        model_type = getattr(model.config, "model_type", None)
        if model_type not in self.export_model_types or not hasattr(model, "lm_head"):
            return (
                f"the source is {type(model).__name__} (model_type {model_type!r}); {target!r} needs a *ForCausalLM "
                f"of one of {self.export_model_types}, whose blocks it reproduces exactly"
            )
        rope = rope_parameters(model.config)
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            return (
                f"the source rotates only part of each head (partial_rotary_factor="
                f"{rope['partial_rotary_factor']}), but {target!r} rotates every dimension of each head"
            )
        if rope.get("rope_type", "default") != "default":
            return (
                f"the source's RoPE is {rope['rope_type']!r}: past original_max_position_embeddings Phi-3's generate "
                f"recomputes the KV cache with the long factors, {target!r} keeps the keys rotated with the short ones"
            )
        return None

    def twin_tensors(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """``qkv_proj [(H + 2K)·hd, d]`` as Llama's ``q_proj [H·hd, d]``, ``k_proj [K·hd, d]``, ``v_proj [K·hd, d]``:
        the row blocks in the order Phi3Attention slices its output, each a copy (safetensors refuses tensors that
        share storage)."""
        for name, tensor in model.state_dict().items():
            if not name.endswith(QKV):
                yield name, tensor
                continue
            attention = model.get_submodule(name.removesuffix(".qkv_proj.weight"))
            queries = attention.config.num_attention_heads * attention.head_dim
            keys = attention.num_key_value_heads * attention.head_dim
            q, k, v = tensor.split([queries, keys, keys], dim=0)
            prefix = name.removesuffix("qkv_proj.weight")
            for projection, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                yield f"{prefix}{projection}.weight", part.clone()
