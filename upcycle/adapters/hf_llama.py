"""Hugging Face Llama / Mistral / Qwen2 (and any model with their gated MLP): ``layers[i].mlp`` with
``gate_proj``, ``up_proj``, ``down_proj`` (Linear, ``[out, in]``) and ``act_fn`` from ``config.hidden_act``:
``down(act(gate(x)) * up(x))``.
"""

from __future__ import annotations

from torch import nn

from ..layers.activations import from_hf
from .base import Adapter, FFNSite, register_adapter, tensor_or_none
from .dense_ffn import DenseFFN
from .hf_common import HFAdapterMixin, base_prefix, is_hf_model


@register_adapter
class HFLlamaAdapter(HFAdapterMixin, Adapter):
    name = "hf_llama"
    family = "Hugging Face Llama / Mistral / Qwen2 (layers[i].mlp: gate_proj, up_proj, down_proj)"
    task = "causal_lm"

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
