"""Export any converted transformers model as a checkpoint that loads with transformers alone:
``AutoModelForCausalLM`` / ``AutoModel`` / ``AutoModelForSequenceClassification.from_pretrained(dir,
trust_remote_code=True)``.

For families with no exact MoE twin in transformers (Gemma, GPT-NeoX, Phi-3, the encoders, ...). The directory
holds the converted model's weights under upcycle's own names, a ``config.json`` that is the dense family's config
plus the MoE layers' structure (``model_type: upcycle_moe``), and the two standalone files of
:mod:`upcycle.export.remote`, named by the config's ``auto_map``. Loading builds the dense family's own class and
puts the same MoE layers in the same places (see ``modeling_upcycle_moe.py``), so the logits are upcycle's.

What the generic class computes: token-choice top-k routing (renormalised, raw or unit weights), D2DMoE's dynamic-k
and MoEfication's routers (inference), over gated or plain experts with their biases, hidden norm and shared bias,
and a shared expert with its optional sigmoid gate. Anything else (slot or expert-choice routers, a capacity limit,
attention projections replaced by MLPs) is refused with the reason before anything is written; ``upcycle.save``
keeps every model exactly.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from ..adapters import adapter_of
from ..adapters.base import MoEFFN
from ..atomic import atomic_directory
from ..layers import Experts, TopKRouter, describe_moe
from ..record import record_of
from .formats import EXPORT_FORMATS
from .hf_moe_common import EXPORT_NOTE
from .saving import DEFAULT_SHARD_BYTES, check_exportable, unique_state
from .shards import ShardWriter
from .tokenizer_files import copy_tokenizer_files

FORMAT = "hf_generic"
GENERIC_ROUTERS = ("topk", "dynamic_k", "moefication")  # what modeling_upcycle_moe.ROUTERS computes
REMOTE_FILES = ("configuration_upcycle_moe.py", "modeling_upcycle_moe.py")
MODEL_CLASS = "modeling_upcycle_moe.UpcycleMoEModel"
# transformers' Auto classes and the mapping that says which class each builds for a model type
AUTO_CLASSES = {
    "AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "AutoModelForSequenceClassification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForMaskedLM": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "AutoModelForTokenClassification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
}


def refuse(reason: str) -> ValueError:
    return ValueError(f"cannot export as {FORMAT!r}: {reason}")


@EXPORT_FORMATS.register(
    FORMAT, "transformers remote code: any converted transformers model, its family's own blocks kept "
    "(from_pretrained(dir, trust_remote_code=True))",
)  # fmt: skip
def export_hf_generic(model: nn.Module, directory: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` (an ``upcycle.convert``-ed transformers model) with the generic MoE class."""
    import transformers

    check_exportable(model, FORMAT)
    record = record_of(model)
    if record is None or not record.layers:
        raise refuse("the model has no MoE layer; export a model returned by upcycle.convert")
    dense_class = type(model).__name__
    if getattr(transformers, dense_class, None) is not type(model):
        raise refuse(
            f"the model's class {type(model).__module__}.{dense_class} is not transformers' own, so a checkpoint "
            "cannot name it; export upcycle's LM as 'mixtral' or 'qwen2_moe', or keep it with upcycle.save"
        )
    layers = {name: moe_layer(model, name) for name in record.layers}
    identity = identity_modules(model, record)
    config = generic_config(model, layers, identity)
    with atomic_directory(Path(directory), overwrite=overwrite) as staging:
        with ShardWriter(staging, DEFAULT_SHARD_BYTES) as writer:
            for name, tensor in unique_state(model).items():
                writer.add(name, tensor)
        (staging / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        remote = resources.files("upcycle.export.remote")
        for name in REMOTE_FILES:
            with resources.as_file(remote / name) as path:
                shutil.copyfile(path, staging / name)
        generation = getattr(model, "generation_config", None)
        if generation is not None and hasattr(model, "generate"):
            generation.save_pretrained(staging)
        source = {"adapter": record.adapter, "class": dense_class}
        note = {"format": FORMAT, "source": source, "convert": record.convert}
        (staging / EXPORT_NOTE).write_text(json.dumps(note, indent=2, default=str) + "\n")
        copy_tokenizer_files(model, staging)
    return Path(directory)


def moe_layer(model: nn.Module, name: str) -> dict:
    """One converted site as the generic class builds it, after checking the class computes what upcycle does."""
    module = model.get_submodule(name)
    if not isinstance(module, MoEFFN) or module.channels_first:
        raise refuse(f"{name} is a {type(module).__name__}, not an MoE over channels-last tokens")
    router, experts = module.moe.router, module.moe.experts
    if router.registry_name not in GENERIC_ROUTERS:
        raise refuse(
            f"{name}: its router is {router.registry_name!r}; the generic class routes with "
            f"{', '.join(GENERIC_ROUTERS)} (keep slot and expert-choice routers with upcycle.save)"
        )
    if isinstance(router, TopKRouter) and router.capacity_factor is not None:
        raise refuse(f"{name}: its router drops tokens above a capacity; convert with router_capacity_factor=None")
    if not isinstance(experts, Experts):
        raise refuse(f"{name}: its experts are {type(experts).__name__}; the generic class holds plain experts")
    return {"moe": describe_moe(module.moe), "dropout": module.dropout.p}


def identity_modules(model: nn.Module, record) -> list[str]:
    """Modules a conversion replaced by ``nn.Identity`` (the down projection of BERT's split FFN, which the MoE took
    over); any other change to the family's module tree is refused, since the generic class cannot rebuild it."""
    with torch.device("meta"):  # the dense skeleton's structure only: nothing allocated
        dense = dict(adapter_of(model).rebuild(record.source).named_modules())
    converted = tuple(f"{name}." for name in record.layers)
    identity, changed = [], []
    for name, module in model.named_modules():
        if name in record.layers or name.startswith(converted):
            continue
        counterpart = dense.get(name)
        if counterpart is not None and type(counterpart) is type(module):
            continue
        (identity if isinstance(module, nn.Identity) and counterpart is not None else changed).append(name)
    if changed:
        raise refuse(
            f"the model's structure differs from its dense family beyond the MoE layers ({', '.join(changed[:5])}); "
            "the generic class rebuilds the family with MoE layers only (keep this model with upcycle.save)"
        )
    return identity


def generic_config(model: nn.Module, layers: dict, identity: list[str]) -> dict:
    from transformers.models.auto import modeling_auto

    dense = model.config.to_dict()
    model_type = dense.pop("model_type")
    dense_class = type(model).__name__
    auto_map = {"AutoConfig": "configuration_upcycle_moe.UpcycleMoEConfig", "AutoModel": MODEL_CLASS}
    for auto_class, mapping in AUTO_CLASSES.items():
        if getattr(modeling_auto, mapping).get(model_type) == dense_class:
            auto_map[auto_class] = MODEL_CLASS
    dense.pop("auto_map", None)
    return {
        **dense,
        "model_type": "upcycle_moe",
        "dense_model_type": model_type,
        "dense_class": dense_class,
        "architectures": ["UpcycleMoEModel"],
        "auto_map": auto_map,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "upcycle_moe": {"layers": layers, "identity": identity},
    }
