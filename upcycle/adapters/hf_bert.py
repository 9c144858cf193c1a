"""Hugging Face BERT-style encoders (BERT, MiniLM / sentence-transformers, RoBERTa, XLM-RoBERTa, ELECTRA and others
with BERT's layer): the FFN is split across
``layer[i].intermediate.dense`` (+ act) and ``layer[i].output.dense``; ``BertOutput`` then applies dropout and
``LayerNorm(h + residual)``. The MoE replaces ``intermediate`` (returning d-dim outputs) and ``output.dense``
becomes the identity, so dropout and the post-norm are kept.
"""

from __future__ import annotations

from torch import nn

from ..layers import MoE
from .base import Adapter, FFNSite, MoEFFN, register_adapter, set_submodule
from .dense_ffn import DenseFFN
from .hf_common import HFAdapterMixin, base_prefix, hf_activation, is_hf_model


@register_adapter
class HFBertAdapter(HFAdapterMixin, Adapter):
    name = "hf_bert"
    family = "Hugging Face BERT / MiniLM / RoBERTa / XLM-R / ELECTRA encoders (encoder.layer[i].intermediate + output)"
    task = "encoder"
    activation_attribute = "intermediate_act_fn"

    def matches(self, model: nn.Module) -> bool:
        """BERT's layer: ``intermediate.dense`` + act, then ``output.dense`` and a post-norm ``output.LayerNorm``."""
        encoder = getattr(self.base(model), "encoder", None) if is_hf_model(model) else None
        layers = getattr(encoder, "layer", None)
        return bool(layers) and all(
            hasattr(getattr(layer, "intermediate", None), "dense")
            and all(hasattr(getattr(layer, "output", None), a) for a in ("dense", "LayerNorm"))
            for layer in layers
        )

    def ffn_sites(self, model: nn.Module) -> list[FFNSite]:
        prefix = base_prefix(model)
        layers = self.base(model).encoder.layer
        return [FFNSite(i, f"{prefix}encoder.layer.{i}.intermediate") for i in range(len(layers))]

    def read_ffn(self, model: nn.Module, site: FFNSite) -> DenseFFN:
        layer = model.get_submodule(site.name.rpartition(".")[0])
        up, down = layer.intermediate.dense, layer.output.dense
        return DenseFFN(
            w_up=up.weight.detach(), w_down=down.weight.detach(), activation=hf_activation(model.config),
            b_up=up.bias.detach(), b_down=down.bias.detach(),
        )  # fmt: skip

    def ffn_modules(self, model: nn.Module) -> set[str]:
        """BERT splits its FFN: ``intermediate`` (up projection, the site) and ``output`` (down projection and the
        post-norm)."""
        sites = super().ffn_modules(model)
        return sites | {f"{name.rpartition('.')[0]}.output" for name in sites}

    def install(self, model: nn.Module, site: FFNSite, moe: MoE) -> None:
        layer_name = site.name.rpartition(".")[0]
        set_submodule(model, site.name, MoEFFN(moe))
        set_submodule(model, f"{layer_name}.output.dense", nn.Identity())

    def dense_counterpart(self, dense_model: nn.Module, name: str) -> nn.Module:
        """The MoE at ``intermediate`` stands for ``intermediate`` then ``output.dense`` (d -> h -> d)."""
        layer = super().dense_counterpart(dense_model, name.rpartition(".")[0])
        return nn.Sequential(layer.intermediate, layer.output.dense)
