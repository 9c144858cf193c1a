"""What the Hugging Face adapters share: the base-model prefix, token inputs, outputs, rebuild from config."""

from __future__ import annotations

import torch
from torch import nn


def is_hf_model(model: nn.Module) -> bool:
    """A transformers model: its class, or a base class (upcycle.models' UpcycleLM derives from PreTrainedModel),
    is defined in transformers."""
    return hasattr(model, "config") and any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def rope_parameters(config) -> dict:
    """transformers v5 keeps RoPE settings in ``rope_parameters``; upcycle_lm has a plain ``rope_theta``."""
    if getattr(config, "rope_parameters", None):
        return dict(config.rope_parameters)
    return {"rope_type": "default", "rope_theta": float(config.rope_theta)}


def base_prefix(model: nn.Module) -> str:
    """``"model."`` for LlamaForCausalLM, ``""`` for a bare LlamaModel: where the transformer stack lives."""
    prefix = getattr(model, "base_model_prefix", "")
    return f"{prefix}." if prefix and hasattr(model, prefix) else ""


class HFAdapterMixin:
    def base(self, model: nn.Module) -> nn.Module:
        prefix = base_prefix(model)
        return model.get_submodule(prefix[:-1]) if prefix else model

    def example_inputs(self, model: nn.Module, batch: int = 2, generator: torch.Generator | None = None) -> dict:
        length = min(16, getattr(model.config, "max_position_embeddings", 16) or 16)
        ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def outputs(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        if getattr(model.config, "use_cache", None) and "use_cache" not in inputs:
            # no KV cache: nothing reads it, and upcycle.verify reruns dense layers on the converted layers'
            # arguments, which would append the dense keys to the converted model's cache
            inputs = {**inputs, "use_cache": False}
        out = model(**inputs)
        return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state

    def describe(self, model: nn.Module) -> dict:
        return {"class": type(model).__name__, "config": model.config.to_dict()}

    def record_activation(self, model: nn.Module, activation: str) -> None:
        for key in ("hidden_act", "activation_function"):  # read_ffn and the rebuild read the config
            if hasattr(model.config, key):
                setattr(model.config, key, activation)

    def rebuild(self, description: dict) -> nn.Module:
        import transformers

        from ..models import get_model_class

        # upcycle's own classes first: loading them registers their model_type with AutoConfig
        model_class = get_model_class(description["class"]) or getattr(transformers, description["class"], None)
        if model_class is None:
            raise ValueError(f"neither transformers nor upcycle.models has a model class {description['class']!r}")
        config_dict = dict(description["config"])
        config = transformers.AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
        return model_class(config)
