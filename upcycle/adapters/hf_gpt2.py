"""Hugging Face GPT-2: ``h[i].mlp`` with ``c_fc`` and ``c_proj`` as ``Conv1D`` (weights stored transposed,
``[in, out]``), activation ``config.activation_function`` (``gelu_new`` = tanh GELU) and residual dropout.
"""

from __future__ import annotations

from torch import nn

from ..layers import MoE
from ..layers.activations import from_hf
from .base import Adapter, FFNSite, MoEFFN, register_adapter, set_submodule
from .dense_ffn import DenseFFN
from .hf_common import HFAdapterMixin, base_prefix, is_hf_model


@register_adapter
class HFGPT2Adapter(HFAdapterMixin, Adapter):
    name = "hf_gpt2"
    family = "Hugging Face GPT-2 (h[i].mlp: Conv1D c_fc, c_proj)"
    task = "causal_lm"

    def matches(self, model: nn.Module) -> bool:
        return is_hf_model(model) and getattr(model.config, "model_type", None) == "gpt2"

    def ffn_sites(self, model: nn.Module) -> list[FFNSite]:
        prefix = base_prefix(model)
        return [FFNSite(i, f"{prefix}h.{i}.mlp") for i in range(len(self.base(model).h))]

    def read_ffn(self, model: nn.Module, site: FFNSite) -> DenseFFN:
        mlp = model.get_submodule(site.name)
        return DenseFFN(
            w_up=mlp.c_fc.weight.detach().T, w_down=mlp.c_proj.weight.detach().T,  # Conv1D: [in, out]
            activation=from_hf(model.config.activation_function),
            b_up=mlp.c_fc.bias.detach(), b_down=mlp.c_proj.bias.detach(),
        )  # fmt: skip

    def install(self, model: nn.Module, site: FFNSite, moe: MoE) -> None:
        set_submodule(model, site.name, MoEFFN(moe, dropout=model.config.resid_pdrop))
