"""Model-family adapters: where the FFNs are, their weight layout, how to swap them, how to rebuild the model."""

from . import hf_bert, hf_gpt2, hf_llama, timm_convnext, timm_vit, upcycle_bam  # noqa: F401  (registration side effect)
from .base import Adapter, FFNSite, MoEFFN, adapter_of, find_adapter, get_adapter, list_adapters

__all__ = ["Adapter", "FFNSite", "MoEFFN", "adapter_of", "find_adapter", "get_adapter", "list_adapters"]
