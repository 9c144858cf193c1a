"""Hugging Face decoders with Llama's gated MLP: ``layers[i].mlp`` with ``gate_proj``, ``up_proj``, ``down_proj``
(Linear, ``[out, in]``) and ``act_fn``: ``down(act(gate(x)) * up(x))``. Llama, Mistral, Qwen2/3, Gemma 1/2/3,
OLMo2, Granite, SmolLM3, StableLM, Cohere2 and any other model with that structure; the rest of each block
(norms with (1+w), embedding scaling, soft-capping, post-norms, q/k norms, sliding windows) stays the family's own.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from .base import CheckpointLayout, register_adapter
from .hf_common import HFMLPAdapter


@register_adapter
class HFLlamaAdapter(HFMLPAdapter):
    name = "hf_llama"
    family = (
        "Hugging Face Llama / Mistral / Qwen2 / Qwen3 / Gemma 1-3 / OLMo2 / Granite / SmolLM3 / StableLM / Cohere2 "
        "(layers[i].mlp: gate_proj, up_proj, down_proj)"
    )
    task = "causal_lm"
    activation_attribute = "act_fn"
    layers_path, ffn_name, up, gate, down = "layers", "mlp", "up_proj", "gate_proj", "down_proj"
    export_formats = (
        "mixtral", "qwen2_moe", "qwen3_moe", "flex_olmo", "granitemoe", "granitemoeshared", "cohere2_moe",
        "ernie4_5_moe", "hunyuan_v1_moe", "glm4_moe", "deepseek_v3",
    )  # fmt: skip
    streaming_model_types = ("llama", "mistral", "qwen2")
    checkpoint_layout = CheckpointLayout(
        base="model.", layers="layers", ffn="mlp",
        tensors={"w_up": "up_proj.weight", "w_gate": "gate_proj.weight", "w_down": "down_proj.weight",
                 "b_up": "up_proj.bias", "b_gate": "gate_proj.bias", "b_down": "down_proj.bias"},
        shapes=lambda c: {"up_proj.weight": (c["intermediate_size"], c["hidden_size"]),
                          "gate_proj.weight": (c["intermediate_size"], c["hidden_size"]),
                          "down_proj.weight": (c["hidden_size"], c["intermediate_size"])},
        activation_key="hidden_act",
    )  # fmt: skip
    # Llama-style attention (RoPE, GQA, RMSNorm) that a BTX / BAM mixture reproduces; upcycle_lm is upcycle's own
    merge_model_types = ("llama", "upcycle_lm")
    block_modules: ClassVar[dict[str, str]] = {
        "ffn": "mlp",
        "attention": "self_attn",
    }  # a layer's FFN and attention, as a merge mixes them
    attention_projections = ("q_proj", "k_proj", "v_proj", "o_proj")  # Q, K, V, O under the attention
    # the MoE formats reproduce these decoders' attention exactly; upcycle_lm only with sequential blocks
    export_model_types = ("llama", "mistral", "qwen2", "qwen3", "upcycle_lm")
    # twins that keep one family's own blocks (post-norms, multipliers, parallel blocks) take that family only
    twin_model_types: ClassVar[dict[str, tuple[str, ...]]] = {
        "flex_olmo": ("olmo2",), "granitemoe": ("granite",), "granitemoeshared": ("granite",),
        "cohere2_moe": ("cohere2",),
        "ernie4_5_moe": ("ernie4_5",), "hunyuan_v1_moe": ("hunyuan_v1_dense",),
        "deepseek_v3": ("deepseek_v3",),  # MLA attention: only a dense DeepSeek-V3 reproduces it
    }  # fmt: skip

    def export_refusal(self, model: nn.Module, target: str) -> str | None:
        refusal = super().export_refusal(model, target)
        if refusal is not None or target == self.generic_format:  # the generic class keeps the family's blocks
            return refusal
        model_type = getattr(model.config, "model_type", None)
        model_types = self.twin_model_types.get(target, self.export_model_types)
        if model_type not in model_types or not hasattr(model, "lm_head"):
            # DeepSeek-V3's MLA cannot compute Llama's attention; GLM4-MoE has DeepSeek-V3's routing on Llama's
            hint = (
                "; export a Llama-family source with sigmoid routers as 'glm4_moe'" if target == "deepseek_v3" else ""
            )
            return (
                f"the source is {type(model).__name__} (model_type {model_type!r}); {target!r} needs a *ForCausalLM "
                f"of one of {model_types}, whose blocks it reproduces exactly{hint}"
            )
        if getattr(model.config, "parallel_attention", False):
            return (
                f"the source has parallel blocks (attention and FFN read one normalised input), but {target}'s "
                "blocks are sequential; merge a sequential seed, or export a BAM mixture with format 'bam'"
            )
        return None
