"""upcycle's BAM model (``UpcycleBAMForCausalLM``, arXiv 2408.08274): its FFNs are MoE layers and its attention a
Mixture of Attention from the start, built from its config; nothing is left to convert. The adapter gives the
model the surface every other one has (training, evaluation, ``upcycle.save`` / ``load``)."""

from __future__ import annotations

from torch import nn

from .base import Adapter, FFNSite, register_adapter
from .dense_ffn import DenseFFN
from .hf_common import HFAdapterMixin, base_prefix, is_hf_model

CLASSES = ("UpcycleBAMForCausalLM", "UpcycleBAMModel")


@register_adapter
class UpcycleBAMAdapter(HFAdapterMixin, Adapter):
    name = "upcycle_bam"
    family = "upcycle's BAM mixture LM (UpcycleBAMForCausalLM: attention experts + FFN experts, upcycle.merge)"
    task = "causal_lm"
    export_formats = ("bam",)

    def matches(self, model: nn.Module) -> bool:
        return is_hf_model(model) and type(model).__name__ in CLASSES

    def ffn_sites(self, model: nn.Module) -> list[FFNSite]:
        return []  # every FFN already is an MoE layer, part of the model class

    def read_ffn(self, model: nn.Module, site: FFNSite) -> DenseFFN:
        raise ValueError("a BAM model has no dense FFN to read: its FFNs are MoE layers already")

    def converted_modules(self, model: nn.Module) -> list[str]:
        """Every block's Mixture of Attention and MoE: each replaces the seed's attention and MLP of the same name."""
        prefix = base_prefix(model)
        count = len(self.base(model).layers)
        return [f"{prefix}layers.{i}.{part}" for i in range(count) for part in ("self_attn", "mlp")]
