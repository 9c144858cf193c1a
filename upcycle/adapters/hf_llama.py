"""Hugging Face Llama / Mistral / Qwen2 (and any model with their gated MLP): ``layers[i].mlp`` with
``gate_proj``, ``up_proj``, ``down_proj`` (Linear, ``[out, in]``) and ``act_fn`` from ``config.hidden_act``:
``down(act(gate(x)) * up(x))``.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from ..layers.activations import from_hf
from .base import Adapter, CheckpointLayout, FFNSite, register_adapter, tensor_or_none
from .dense_ffn import DenseFFN
from .hf_common import HFAdapterMixin, base_prefix, is_hf_model


@register_adapter
class HFLlamaAdapter(HFAdapterMixin, Adapter):
    name = "hf_llama"
    family = "Hugging Face Llama / Mistral / Qwen2 (layers[i].mlp: gate_proj, up_proj, down_proj)"
    task = "causal_lm"
    activation_attribute = "act_fn"
    export_formats = ("mixtral", "qwen2_moe", "qwen3_moe")
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

    def export_refusal(self, model: nn.Module, target: str) -> str | None:
        refusal = super().export_refusal(model, target)
        if refusal is not None:
            return refusal
        model_type = getattr(model.config, "model_type", None)
        if model_type not in self.export_model_types or not hasattr(model, "lm_head"):
            return (
                f"the source is {type(model).__name__} (model_type {model_type!r}); exports need a *ForCausalLM of "
                f"one of {self.export_model_types}, whose attention the target reproduces exactly"
            )
        if getattr(model.config, "parallel_attention", False):
            return (
                f"the source has parallel blocks (attention and FFN read one normalised input), but {target}'s "
                "blocks are sequential; merge a sequential seed, or export a BAM mixture with format 'bam'"
            )
        return None

    def matches(self, model: nn.Module) -> bool:
        if not is_hf_model(model):
            return False
        layers = getattr(self.base(model), "layers", None)
        return bool(layers) and all(
            all(hasattr(getattr(layer, "mlp", None), a) for a in ("gate_proj", "up_proj", "down_proj"))
            for layer in layers
        )

    def ffn_sites(self, model: nn.Module) -> list[FFNSite]:
        prefix = base_prefix(model)
        return [FFNSite(i, f"{prefix}layers.{i}.mlp") for i in range(len(self.base(model).layers))]

    def read_ffn(self, model: nn.Module, site: FFNSite) -> DenseFFN:
        mlp = model.get_submodule(site.name)
        return DenseFFN(
            w_up=mlp.up_proj.weight.detach(), w_down=mlp.down_proj.weight.detach(),
            activation=from_hf(model.config.hidden_act), b_up=tensor_or_none(mlp.up_proj, "bias"),
            w_gate=mlp.gate_proj.weight.detach(), b_gate=tensor_or_none(mlp.gate_proj, "bias"),
            b_down=tensor_or_none(mlp.down_proj, "bias"),
        )  # fmt: skip
