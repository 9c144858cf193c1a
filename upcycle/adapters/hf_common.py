"""What the Hugging Face adapters share: the base-model prefix, token inputs, outputs, rebuild from config."""

from __future__ import annotations

import copy

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

    def with_classifier(self, model: nn.Module, num_labels: int) -> nn.Module:
        """The family's ``*ForSequenceClassification`` around the model's body (its MoE layers included), with a
        fresh head initialised as transformers initialises it (a pooler the body lacks too). A bare encoder's
        converted layers move under the class's base-model prefix (``bert.``), and the record follows."""
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

        from ..errors import UserError
        from ..record import ConversionRecord, attach_record, record_of

        config = copy.deepcopy(model.config)
        class_name = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(config.model_type)
        model_class = getattr(transformers, class_name, None) if class_name else None
        if model_class is None:
            raise UserError(f"transformers has no sequence-classification class for {config.model_type} models")
        config.num_labels, config.architectures = num_labels, [class_name]
        if getattr(config, "pad_token_id", None) is None:  # decoders pool at the last non-padding token
            config.pad_token_id = getattr(config, "eos_token_id", None)
        with torch.device("meta"):  # only the head is new: nothing else is allocated
            classifier = model_class(config)
        prefix = classifier.base_model_prefix
        wrapped = not hasattr(model, prefix)  # a bare encoder (BertModel) becomes the classifier's body
        setattr(classifier, prefix, model if wrapped else getattr(model, prefix))
        dtype = next(model.parameters()).dtype
        for module in classifier.modules():
            if any(p.is_meta for p in module.parameters(recurse=False)):
                module.to_empty(device="cpu", recurse=False)
                classifier._init_weights(module)
                module.to(dtype)
        classifier.train(model.training)
        record = copy.deepcopy(record_of(model)) or ConversionRecord()
        record.source = self.describe(classifier)
        if wrapped:
            record.layers = {f"{prefix}.{name}": layer for name, layer in record.layers.items()}
        attach_record(classifier, record)
        return classifier

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
