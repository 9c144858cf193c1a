"""What a streaming conversion reads before it writes anything: config.json, the safetensors headers, the FFN sites
checked against config.json, and the order in which tensors are read (a :class:`Plan`); then reading one dense FFN
and converting it with the registered method."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..adapters.base import Adapter, CheckpointLayout, FFNSite, all_adapters
from ..adapters.dense_ffn import DenseFFN
from ..config import ConvertConfig, select_layers
from ..layers import MoE
from ..layers.activations import from_hf
from ..record import ConversionRecord
from ..recycling import get_method
from ..sources import resolve_local
from .checkpoint import Checkpoint

Step = tuple[FFNSite | str, int]  # (a tensor name to copy, 1) or (an FFN site to convert, its tensor count)


@dataclass
class Plan:
    """Everything a streaming conversion knows before it writes: checked against config.json from the headers."""

    cfg: ConvertConfig
    source_dir: Path
    origin: ConversionRecord  # where the source came from (its tokenizer files, a hub id's revision)
    source: dict  # the record's ``source``: {"class", "config"}
    adapter: Adapter
    layout: CheckpointLayout
    checkpoint: Checkpoint
    sites: list[FFNSite]  # the FFNs to convert, in increasing index order
    steps: list[Step]
    activation: str

    @property
    def total(self) -> int:
        return sum(count for _, count in self.steps)


def prepare(source_dir: str | Path, out_dir: Path, cfg: ConvertConfig, overwrite: bool) -> Plan:
    """Read and check the source; refuse what cannot stream, before anything is written."""
    if get_method(cfg.method).prepare is not None:
        raise ValueError(
            f"method {cfg.method!r} looks at the whole model first (calibration); convert without streaming"
        )
    if cfg.router.init == "data":
        raise ValueError("router init 'data' runs calibration through the whole converted model; convert without "
                         "streaming")  # fmt: skip
    source_dir, origin = resolve_local(str(source_dir))  # a folder, or a hub id's cached snapshot
    source = read_source(source_dir)
    if out_dir.resolve() == source_dir.resolve():
        raise ValueError(f"the output directory {out_dir} is the source checkpoint; choose another")
    if out_dir.exists() and not overwrite:  # fail before reading anything; atomic_directory checks again
        raise FileExistsError(f"{out_dir} already exists; choose another output directory or pass overwrite=True")
    adapter = streaming_adapter(source["config"].get("model_type"), source_dir / "config.json")
    layout = adapter.checkpoint_layout
    checkpoint = Checkpoint(source_dir)
    sites = ffn_sites(checkpoint, source["config"], layout)
    chosen = [sites[i] for i in select_layers(len(sites), cfg.layers)]
    steps = plan_steps(checkpoint, chosen, base_prefix(checkpoint, layout), layout)
    activation = from_hf(source["config"][layout.activation_key])
    return Plan(cfg, source_dir, origin, source, adapter, layout, checkpoint, chosen, steps, activation)


def read_source(directory: Path) -> dict:
    """The record's ``source`` ({"class", "config"}) from a Hugging Face model directory, validated."""
    if not directory.exists():
        raise FileNotFoundError(f"source checkpoint {directory} does not exist")
    if not directory.is_dir():
        raise ValueError(f"source checkpoint {directory} is not a directory (expected a Hugging Face model folder)")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} is not a Hugging Face model directory: config.json is missing")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON ({error})") from None
    model_type = raw.get("model_type")
    streaming_adapter(model_type, config_path)  # a family that streams, or a clear error
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory)  # the config dict the loaded model would carry
    architectures = raw.get("architectures") or []
    if architectures:
        model_class = architectures[0]
    else:  # no architectures recorded: the family's causal LM, as AutoModelForCausalLM would pick
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        model_class = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    return {"class": model_class, "config": config.to_dict()}


def meta_model(build, *args) -> nn.Module:
    """A model's structure without its memory: parameters on the ``meta`` device."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build(*args)


def first_dtype(plan: Plan) -> torch.dtype:
    """The dtype of the dense model's first parameter (the token embeddings), which ``convert`` and ``merge`` record
    and ``upcycle.load`` rebuilds the model in."""
    dense = meta_model(plan.adapter.rebuild, plan.source)
    first = next(name for name, _ in dense.named_parameters())
    info = plan.checkpoint.tensors.get(first)
    return info.dtype if info is not None and info.dtype is not None else torch.float32


def streaming_adapter(model_type: str | None, config_path: Path) -> Adapter:
    """The adapter whose family streams checkpoints of ``model_type``."""
    adapter = next((a for a in all_adapters() if model_type in a.streaming_model_types), None)
    if adapter is None:
        supported = sorted(t for a in all_adapters() for t in a.streaming_model_types)
        raise ValueError(f"streaming conversion supports model_type {', '.join(supported)}; {config_path} has "
                         f"{model_type!r} (convert other models in memory with upcycle.convert)")  # fmt: skip
    return adapter


def base_prefix(checkpoint: Checkpoint, layout: CheckpointLayout) -> str:
    """The layout's base prefix for a task-model checkpoint, empty for a bare base model (the adapter's
    ``base_prefix``)."""
    stack = f"{layout.base}{layout.layers}."
    return layout.base if any(name.startswith(stack) for name in checkpoint.tensors) else ""


def layer_index(name: str, prefix: str, layout: CheckpointLayout) -> int | None:
    """i for ``<prefix><layers>.<i>.…``, else None."""
    stack = f"{prefix}{layout.layers}."
    if not name.startswith(stack):
        return None
    index = name[len(stack) :].split(".", 1)[0]
    return int(index) if index.isdigit() else None


def ffn_sites(checkpoint: Checkpoint, config: dict, layout: CheckpointLayout) -> list[FFNSite]:
    """The FFN of every layer, named as the adapter's ``ffn_sites`` names them, checked against config.json.

    Checked from the headers only: no weight is read, and no model class is imported.
    """
    names, prefix = checkpoint.tensors, base_prefix(checkpoint, layout)
    count = config["num_hidden_layers"]
    found = {layer_index(name, prefix, layout) for name in names} - {None}
    if found != set(range(count)):
        held = f"layers {min(found)}..{max(found)} ({len(found)} in all)" if found else "no layers"
        raise ValueError(f"{checkpoint.directory}: config.json has {count} layers but the checkpoint holds {held}")
    expected = layout.shapes(config)
    sites, problems = [], []
    for i in range(count):
        site = FFNSite(i, f"{prefix}{layout.layers}.{i}.{layout.ffn}")
        for suffix, shape in expected.items():
            info = names.get(f"{site.name}.{suffix}")
            if info is None or info.shape != shape:
                got = "missing" if info is None else f"shape {info.shape}"
                problems.append(f"{site.name}.{suffix}: {got}, expected {shape} from config.json")
        sites.append(site)
    if problems:
        raise ValueError(f"{checkpoint.directory} does not have the FFN tensors its config.json describes: "
                         + "; ".join(problems[:5]))  # fmt: skip
    return sites


def plan_steps(checkpoint: Checkpoint, sites: list[FFNSite], prefix: str,
               layout: CheckpointLayout) -> list[tuple[FFNSite | str, int]]:  # fmt: skip
    """(a tensor name to copy, 1) or (an FFN site to convert, its tensor count), layers in increasing index order.

    Tensors outside the layers (embeddings, final norm, head) come first; then each layer's, so converted FFNs meet
    the generator in the order ``convert`` uses. Stale rotary ``inv_freq`` buffers of old checkpoints are dropped,
    as ``from_pretrained`` drops them: the model does not load them.
    """
    stale = sorted(name for name in checkpoint.tensors if name.endswith("rotary_emb.inv_freq"))
    if stale:
        warnings.warn(f"skipping {len(stale)} stale rotary_emb.inv_freq tensors", stacklevel=3)

    def order(name: str) -> tuple[int, str]:
        index = layer_index(name, prefix, layout)
        return -1 if index is None else index, name

    names = sorted(set(checkpoint.tensors) - set(stale), key=order)
    steps: dict[FFNSite | str, int] = {}
    for name in names:
        site = next((s for s in sites if name.startswith(f"{s.name}.")), None)
        key = name if site is None else site
        steps[key] = steps.get(key, 0) + 1
    return list(steps.items())


def read_dense_ffn(checkpoint: Checkpoint, site: FFNSite, activation: str, layout: CheckpointLayout) -> DenseFFN:
    """The FFN at ``site`` as a DenseFFN: the fields the adapter's ``read_ffn`` reads from a loaded model."""
    names = {field: f"{site.name}.{suffix}" for field, suffix in layout.tensors.items()}
    tensors = checkpoint.read(name for name in names.values() if name in checkpoint.tensors)
    try:
        dense = DenseFFN(activation=activation, **{field: tensors.get(name) for field, name in names.items()})
    except ValueError as error:  # NaN / Inf or shapes: name the layer and the file
        raise ValueError(f"{site.name} in {checkpoint.tensors[names['w_up']].file}: {error}") from None
    return dense


def ffn_bytes(checkpoint: Checkpoint, site: FFNSite) -> int:
    return sum(info.nbytes for name, info in checkpoint.tensors.items() if name.startswith(f"{site.name}."))


def convert_ffn(dense: DenseFFN, site: FFNSite, cfg: ConvertConfig, generator: torch.Generator) -> MoE:
    try:
        moe = get_method(cfg.method).fn(dense, cfg, generator)
    except ValueError as error:
        raise ValueError(f"{site.name}: {error}") from None
    moe.experts.backend = cfg.backend
    return moe.eval()  # as a loaded model is: the equivalence check runs without training-only router noise
