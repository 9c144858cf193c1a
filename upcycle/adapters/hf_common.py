"""What the Hugging Face adapters share: the base-model prefix, token inputs, outputs, rebuild from config, and the
adapter of every family whose layers each hold one FFN module (:class:`HFMLPAdapter`)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import nn

from ..layers import MoE
from ..layers.activations import from_hf
from .base import Adapter, FFNSite, MoEFFN, set_submodule, tensor_or_none
from .dense_ffn import DenseFFN

# Where a family's config names its FFN activation, in the order they are read: Gemma 2/3 use hidden_activation
# (Gemma 1 keeps it None beside hidden_act), GPT-2 activation_function, DistilBERT activation.
ACTIVATION_KEYS = ("hidden_activation", "hidden_act", "activation_function", "activation")


def is_hf_model(model: nn.Module) -> bool:
    """A transformers model: its class, or a base class (upcycle.models' UpcycleLM derives from PreTrainedModel),
    is defined in transformers."""
    return hasattr(model, "config") and any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def hf_activation(config) -> str:
    """upcycle's name for the FFN activation the config names."""
    for key in ACTIVATION_KEYS:
        value = getattr(config, key, None)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(f"config.{key} is a callable; upcycle reads named activations only (e.g. 'gelu')")
        return from_hf(value)
    raise ValueError(f"the config names no FFN activation (none of {', '.join(ACTIVATION_KEYS)})")


def linear_weight(module: nn.Module) -> torch.Tensor:
    """A projection's weight as ``[out, in]``: GPT-2's ``Conv1D`` stores it transposed, ``[in, out]``."""
    weight = module.weight.detach()
    return weight.T if type(module).__name__ == "Conv1D" else weight


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
    generic_format = "hf_generic"  # upcycle's remote-code class: any converted transformers model, its family kept

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

    def twin_tensors(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """The model's tensors under the names the Hugging Face MoE twins give their backbone (Llama's unfused
        ``self_attn.{q,k,v,o}_proj``; the export writers replace the ``mlp`` part): the model's own by default. A
        family with fused projections (Phi-3's ``qkv_proj``) splits them here, each part its own copy."""
        yield from model.state_dict().items()

    def record_activation(self, model: nn.Module, activation: str) -> None:
        for key in ACTIVATION_KEYS:  # read_ffn and the rebuild read the config
            if getattr(model.config, key, None) is not None:
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


class HFMLPAdapter(HFAdapterMixin, Adapter):
    """A family whose every layer holds one FFN module, ``<base><layers>.<i>.<ffn>``, that the MoE replaces whole.

    Subclasses name the projections: ``up`` and ``down`` always; ``gate`` for a gated FFN with separate
    projections (``down(act(gate(x)) * up(x))``), or ``fused_gate_up`` for one projection holding both halves
    (Phi-3, ModernBERT), the activated half first unless ``activated_half_first`` is False.
    """

    layers_path: ClassVar[str]  # the layer list under the base model: "layers", "h", "transformer.layer"
    ffn_name: ClassVar[str]  # the FFN module in each layer
    up: ClassVar[str | None] = None
    down: ClassVar[str]
    gate: ClassVar[str | None] = None
    fused_gate_up: ClassVar[str | None] = None
    activated_half_first: ClassVar[bool] = True
    model_types: ClassVar[tuple[str, ...]] = ()  # config.model_type values it covers; () = any with the structure
    dropout_key: ClassVar[str | None] = None  # config key of the dropout the FFN module applies to its output

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        return self.base(model).get_submodule(self.layers_path)

    def projections(self) -> tuple[str, ...]:
        return tuple(p for p in (self.up, self.gate, self.fused_gate_up, self.down) if p)

    def matches(self, model: nn.Module) -> bool:
        if not is_hf_model(model):
            return False
        if self.model_types and getattr(model.config, "model_type", None) not in self.model_types:
            return False
        try:
            layers = self.layer_list(model)
        except AttributeError:
            return False
        return len(layers) > 0 and all(
            all(hasattr(getattr(layer, self.ffn_name, None), p) for p in self.projections()) for layer in layers
        )

    def ffn_sites(self, model: nn.Module) -> list[FFNSite]:
        prefix = f"{base_prefix(model)}{self.layers_path}"
        return [FFNSite(i, f"{prefix}.{i}.{self.ffn_name}") for i in range(len(self.layer_list(model)))]

    def read_ffn(self, model: nn.Module, site: FFNSite) -> DenseFFN:
        ffn = model.get_submodule(site.name)
        down = getattr(ffn, self.down)
        if self.fused_gate_up:
            fused = getattr(ffn, self.fused_gate_up)
            halves = linear_weight(fused).chunk(2, dim=0)  # [2h, d] -> 2 x [h, d]
            biases = (None, None) if fused.bias is None else fused.bias.detach().chunk(2)
            gate_at = 0 if self.activated_half_first else 1
            w_gate, w_up, b_gate, b_up = halves[gate_at], halves[1 - gate_at], biases[gate_at], biases[1 - gate_at]
        else:
            up = getattr(ffn, self.up)
            w_up, b_up = linear_weight(up), tensor_or_none(up, "bias")
            gate = getattr(ffn, self.gate) if self.gate else None
            w_gate = None if gate is None else linear_weight(gate)
            b_gate = tensor_or_none(gate, "bias")
        return DenseFFN(
            w_up=w_up, w_down=linear_weight(down), activation=hf_activation(model.config), b_up=b_up,
            w_gate=w_gate, b_gate=b_gate, b_down=tensor_or_none(down, "bias"),
        )  # fmt: skip

    def install(self, model: nn.Module, site: FFNSite, moe: MoE) -> None:
        dropout = getattr(model.config, self.dropout_key, 0.0) if self.dropout_key else 0.0
        set_submodule(model, site.name, MoEFFN(moe, dropout=dropout or 0.0))
