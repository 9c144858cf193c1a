"""Streaming conversion: a Hugging Face checkpoint directory of a family whose adapter declares its tensor layout
(``Adapter.checkpoint_layout``: the Llama family) -> an upcycle model directory, one tensor at a time, so
checkpoints larger than memory convert.

``upcycle.convert`` needs the whole dense model in memory and ``upcycle.save`` then holds the whole converted
model (E copies of every FFN). Sparse upcycling (Komatsuzaki et al., arXiv 2212.05055) only ever looks at one FFN
at a time, so the conversion can stream instead:

  1. read config.json and the safetensors *headers* (names, shapes; no weights) and check every layer's FFN
     against config.json, so a bad checkpoint fails before any work;
  2. walk the tensors, layers in increasing index order: each tensor outside a converted FFN is read and passed
     through unchanged; each converted FFN is read whole (gate/up/down projections: a :class:`DenseFFN`), turned
     into an MoE layer by the registered method and written as ``<site>.moe.<name>``;
  3. write the record ``upcycle.convert`` attaches (``config.json``, ``recipe.yaml``), after checking that
     ``upcycle.load`` rebuilds exactly the tensors written: the skeleton it builds, on the ``meta`` device.

The output holds bitwise the tensors, and the same record, that ``upcycle.save(upcycle.convert(model, config))``
writes (only shard boundaries differ): layers are converted in increasing index order with one ``torch.Generator``
seeded with ``config.seed``, as ``convert`` does.

Memory: the output shard being filled (``max_shard_bytes``, 256 MiB by default here, against 2 GiB for
``upcycle.save``) plus one dense FFN, on top of the interpreter with torch and transformers' config machinery
(~0.4 GB). A shard is closed before a layer is converted when its experts would not fit, so they never sit next to
a full one. Each read opens the shard file anew: safetensors memory-maps it, and pages of a mapping that stays open
count toward the process's RSS until it is closed, so one long-lived handle would "use" as much memory as the file
is large. The transformers model class, whose import alone adds ~0.15 GB, is imported only for the final check,
past the peak.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm

from .adapters.base import Adapter, CheckpointLayout, FFNSite, all_adapters
from .adapters.dense_ffn import DenseFFN
from .atomic import atomic_directory
from .config import RUNTIME_FIELDS, ConvertConfig, load_convert_config, select_layers
from .errors import check_finite
from .export.saving import build_skeleton, write_record
from .export.shards import INDEX, SINGLE, ShardWriter, shard_files
from .layers import MoE, describe_moe
from .layers.activations import from_hf
from .record import ConversionRecord, new_record
from .recycling import get_method
from .sources import resolve_local

STREAM_SHARD_BYTES = 256 * 1024**2  # small: the pending output shard is most of the peak memory
Written = dict[str, tuple[tuple[int, ...], torch.dtype]]  # output tensor name -> (shape, dtype)


ITEM_BYTES = {  # bytes per element of a safetensors dtype
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    nbytes: int


class ReservingShardWriter(ShardWriter):
    """A ShardWriter that can close its shard before a layer's outputs exist, so a layer's experts never sit in
    memory next to an already full shard: the peak is one shard plus the dense FFN, not plus the experts too."""

    def reserve(self, nbytes: int) -> None:
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        super()._flush()
        trim_heap()


class Checkpoint:
    """The tensors of a safetensors checkpoint directory: headers read once up front, weights read on demand."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.files = _safetensors_files(directory)
        self.tensors: dict[str, TensorInfo] = {}
        for path in self.files:
            for name, (shape, nbytes) in _header(path).items():
                self.tensors[name] = TensorInfo(path, shape, nbytes)
        self._check_index()

    def _check_index(self) -> None:
        """Every tensor the index promises must be in the shard it names (a shard replaced by another fails here)."""
        if not (self.directory / INDEX).is_file():
            return
        weight_map = json.loads((self.directory / INDEX).read_text())["weight_map"]
        held = {name: info.file.name for name, info in self.tensors.items()}
        wrong = [name for name, file in weight_map.items() if held.get(name) != file]
        if wrong:
            raise ValueError(f"{self.directory / INDEX} lists tensors its shards do not hold: {wrong[:5]}")

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each file opened once per call and closed again (see the module docstring)."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.tensors[name].file, []).append(name)
        out = {}
        for path, file_names in by_file.items():
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for name in file_names:
                        out[name] = handle.get_tensor(name)
            except (SafetensorError, OSError) as error:
                raise ValueError(f"{path} cannot be read ({error}); it is truncated or corrupt") from None
        return out


def trim_heap() -> None:
    """Give the freed shard's memory back to the OS. Tensors under glibc's mmap threshold (up to 32 MB once it has
    adapted) live on the heap, whose free holes otherwise stay resident: ~40 MB of peak RSS for SmolLM2's 3.5 MB
    projections. A no-op where the C library has no ``malloc_trim`` (musl, macOS)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _safetensors_files(directory: Path) -> list[Path]:
    if not (directory / INDEX).is_file() and not (directory / SINGLE).is_file():
        found = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".safetensors", ".pt", ".pth"))
        hint = f" (found {found}; re-save it with save_pretrained(..., safe_serialization=True))" if found else ""
        raise FileNotFoundError(f"{directory} holds no {SINGLE} nor {INDEX}{hint}")
    return shard_files(directory)  # raises FileNotFoundError naming any missing shard


def _header(path: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """name -> (shape, bytes) from a safetensors header; safetensors also checks the file is as long as it says."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            slices = {name: handle.get_slice(name) for name in handle.keys()}  # noqa: SIM118
            return {name: _shape_and_bytes(piece) for name, piece in slices.items()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} cannot be read ({error}); it is truncated or corrupt") from None


def _shape_and_bytes(piece) -> tuple[tuple[int, ...], int]:
    shape = tuple(piece.get_shape())
    return shape, math.prod(shape) * ITEM_BYTES.get(piece.get_dtype(), 1)  # the rest (int8, fp8, bool) are bytes


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
    return moe


def stream_tensors(
    checkpoint: Checkpoint,
    steps: list[tuple[FFNSite | str, int]],
    writer: ReservingShardWriter,
    cfg: ConvertConfig,
    activation: str,
    layout: CheckpointLayout,
    bar: tqdm,
) -> tuple[dict, Written]:
    """Write every step's output tensors; returns the MoE layers' record entries and what was written."""
    generator = torch.Generator().manual_seed(cfg.seed)
    layers, written = {}, {}
    layer_bytes = 0  # the previous MoE layer's size: the next one's, in a homogeneous stack
    for step, count in steps:
        if isinstance(step, str):
            outputs = checkpoint.read([step])
        else:
            writer.reserve(layer_bytes or cfg.num_experts * ffn_bytes(checkpoint, step))
            dense = read_dense_ffn(checkpoint, step, activation, layout)
            moe = convert_ffn(dense, step, cfg, generator)
            del dense  # freed before its experts join the pending shard
            layers[step.name] = {"index": step.index, **describe_moe(moe)}
            outputs = {f"{step.name}.moe.{name}": tensor for name, tensor in moe.state_dict().items()}
            layer_bytes = sum(tensor.numel() * tensor.element_size() for tensor in outputs.values())
            del moe  # reference counting frees it (no cycles): no gc.collect, which costs ~0.25 s a call here
        # the dense FFNs are checked as they are read; everything else is copied through, so check it here
        check_finite(outputs.items(), f"the source {checkpoint.directory}", "the checkpoint is corrupt; nothing was "
                     "written")  # fmt: skip
        for name, tensor in outputs.items():
            writer.add(name, tensor)
            written[name] = (tuple(tensor.shape), tensor.dtype)
        del outputs  # the writer holds the only reference: a flushed shard frees its tensors
        bar.update(count)
    return layers, written


def tied_groups(model: nn.Module) -> list[list[str]]:
    """State-dict names in model order, names of one tensor object (tied embeddings) grouped together."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


def check_written(record: ConversionRecord, written: Written) -> None:
    """``upcycle.load`` rebuilds the skeleton from ``record``: it must hold exactly the written tensors."""
    skeleton = meta_model(build_skeleton, record)
    state = skeleton.state_dict(keep_vars=True)
    problems = [f"{name} is not in the model" for name in written if name not in state]
    problems += [
        f"{name} {shape} is {tuple(state[name].shape)} in the model"
        for name, (shape, _) in written.items()
        if name in state and shape != tuple(state[name].shape)
    ]
    problems += [f"{group[0]} is missing" for group in tied_groups(skeleton) if not any(n in written for n in group)]
    if problems:
        raise ValueError(
            f"the checkpoint does not match the {record.source['class']} that config.json describes: "
            + "; ".join(problems[:5])
        )


def record_dtype(dense: nn.Module, written: Written) -> str:
    """``convert`` records the dtype of the model's first parameter (the token embeddings for Llama)."""
    first = next(name for name, _ in dense.named_parameters())
    dtype = written[first][1] if first in written else next(iter(written.values()))[1]
    return str(dtype).removeprefix("torch.")


def convert_streaming(
    source_dir: str | Path,
    out_dir: str | Path,
    config: ConvertConfig | dict | str | Path | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    max_shard_bytes: int = STREAM_SHARD_BYTES,
    **overrides,
) -> Path:
    """Convert the checkpoint in ``source_dir`` (a folder, or a hub id) tensor by tensor into an upcycle model
    directory ``out_dir``.

    ``config`` and ``overrides`` are those of :func:`upcycle.convert` (``method="sparse_upcycling",
    num_experts=8, top_k=2, layers="every_other", ...``). The result is what ``upcycle.save`` writes for
    ``upcycle.convert(AutoModelForCausalLM.from_pretrained(source_dir), config)`` and loads with
    ``upcycle.load(out_dir)``. The write is atomic; an existing ``out_dir`` is replaced only with ``overwrite``.
    ``max_shard_bytes`` bounds the output shard held in memory, hence most of the peak memory.
    """
    cfg = load_convert_config(config, **overrides)
    if get_method(cfg.method).prepare is not None:
        raise ValueError(
            f"method {cfg.method!r} looks at the whole model first (calibration); convert without streaming"
        )
    source_dir, origin = resolve_local(str(source_dir))  # a folder, or a hub id's cached snapshot
    out_dir = Path(out_dir)
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
    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        total = sum(count for _, count in steps)
        bar = tqdm(total=total, desc=f"stream {cfg.method}", unit="tensor", disable=not progress, leave=False)
        with bar, ReservingShardWriter(staging, max_shard_bytes) as writer:
            layers, written = stream_tensors(checkpoint, steps, writer, cfg, activation, layout, bar)
        # the model class is imported only now, past the memory peak: its import alone adds ~150 MB of RSS
        dense = meta_model(adapter.rebuild, source)
        record = new_record(adapter.name, source, record_dtype(dense, written), layers,
                            convert=cfg.model_dump(exclude=RUNTIME_FIELDS), origin=origin)  # fmt: skip
        check_written(record, written)
        write_record(staging, record)
    return out_dir
