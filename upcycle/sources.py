"""Resolve a SOURCE string to a dense (or saved MoE) model.

    DIR                  a Hugging Face model directory (config.json + safetensors)
    ORG/NAME[@REVISION]  a Hugging Face hub id, through huggingface_hub and its cache (``upcycle.hub``); a local path
                         of the same spelling wins
    FILE.gguf            a GGUF checkpoint, dequantised by transformers once and cached as safetensors
    timm:ARCH.TAG        timm's pretrained weights (timm's own loader, through the hub cache); ``timm:ARCH`` with
                         ``pretrained`` (its default tag), ``checkpoint=`` a safetensors state dict, or an explicit
                         ``random_init`` (a fixed seeded init)
    DIR (upcycle save)   a directory written by ``upcycle.save`` (config.json holds an upcycle record)

Checkpoints are read from safetensors; pickle files (``.bin``, ``.pt``, ``.pth``) are refused unless the caller
opts in with ``allow_pickle`` and are then read with ``torch.load(weights_only=True)``. Every loaded tensor is
checked to be finite. Models load in fp32 unless ``dtype`` says otherwise ("auto": as stored).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from . import errors
from ._optional import require
from .atomic import atomic_directory
from .errors import UserError
from .record import ConversionRecord, attach_record, record_of

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def cache_root() -> Path:
    return Path(os.environ.get("UPCYCLE_CACHE", Path.home() / ".cache" / "upcycle"))


def load_source(source: str | Path, checkpoint: str | Path | None = None, allow_pickle: bool = False,
                timm_kwargs: dict | None = None, *, pretrained: bool = False, random_init: bool = False,
                dtype: str = "float32") -> nn.Module:  # fmt: skip
    """The model a SOURCE string names, in eval mode, in ``dtype`` ("auto": as the source stores it).

    A local path wins over a hub id of the same spelling. A ``timm:ARCH`` source needs weights: a pretrained tag
    (``timm:ARCH.TAG``, or ``pretrained`` for timm's default tag), a ``checkpoint`` file, or an explicit
    ``random_init``.
    """
    source = str(source)
    torch_dtype = parse_dtype(dtype)
    if source.startswith("timm:"):
        model = load_timm_source(source[len("timm:") :], checkpoint, allow_pickle, timm_kwargs or {},
                                 pretrained=pretrained, random_init=random_init)  # fmt: skip
    else:
        if checkpoint is not None or pretrained or random_init:
            raise UserError("--checkpoint, --pretrained and --random-init go with a timm:ARCH source only")
        model = load_path_or_hub_id(source, allow_pickle, torch_dtype)
    if torch_dtype is not None:
        model.to(torch_dtype)
    check_finite(model, f"the source {source}")
    return model.eval()


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype | None:
    """The torch dtype ``name`` names, or None for "auto" (keep the source's)."""
    if name != "auto" and name not in DTYPES:
        raise UserError(f"--dtype takes auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES.get(name)


def resolve_local(source: str, allow_pickle: bool = False) -> tuple[Path, ConversionRecord]:
    """The local path SOURCE names (for a hub id, its cached snapshot) and the record of where it came from."""
    from .hub import parse_hub_id, snapshot

    path = Path(source)
    if path.exists():
        return path, ConversionRecord.of_folder(path)
    if source.endswith(".gguf"):
        raise FileNotFoundError(f"GGUF file {source} does not exist")
    if parse_hub_id(source) is None:
        raise FileNotFoundError(f"source {source} does not exist (expected a directory, a .gguf file, a hub id "
                                "ORG/NAME[@REVISION] or timm:ARCH)")  # fmt: skip
    hub = snapshot(source, allow_pickle)
    return hub.path, ConversionRecord(origin=hub.repo_id, revision=hub.commit, files=str(hub.path))


def load_path_or_hub_id(source: str, allow_pickle: bool, dtype: torch.dtype | None) -> nn.Module:
    """A local folder or .gguf file, else the hub id's cached snapshot; an upcycle folder loads as saved."""
    path, origin = resolve_local(source, allow_pickle)
    if path.is_file() and path.suffix == ".gguf":
        model = load_hf_directory(cache_gguf(path), dtype=dtype)
        record_of(model).origin = source  # read from the dequantised copy, which holds its tokenizer files
        return model
    if not path.is_dir():
        raise UserError(f"source {source} is a file; give a model directory, a .gguf file, a hub id or timm:ARCH")
    if is_upcycle_directory(path):
        from .export import load

        return load(path)  # its record says what it was converted from
    model = load_hf_directory(path, allow_pickle, dtype)
    attach_record(model, origin)
    return model


def is_upcycle_directory(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        record = json.loads(config.read_text())
        return "adapter" in record and "layers" in record
    except json.JSONDecodeError:
        return False


def check_finite(model: nn.Module, what: str = "the source") -> None:
    errors.check_finite(model.state_dict().items(), what, "the checkpoint is corrupt; re-download or re-save it")


def read_state_dict(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise UserError(f"checkpoint {path} cannot be read ({error}); it is truncated or corrupt") from None
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UserError(
                f"{path} is a pickle file, which can run code when loaded; convert it to safetensors or pass "
                "--allow-pickle to read it with torch.load(weights_only=True)"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    raise UserError(f"checkpoint {path} has an unknown format; expected .safetensors")


def load_timm_source(name: str, checkpoint: str | Path | None, allow_pickle: bool, kwargs: dict, *,
                     pretrained: bool, random_init: bool) -> nn.Module:  # fmt: skip
    """``timm:NAME`` with the weights the user chose: exactly one of a tag or ``pretrained``, a checkpoint, or
    ``random_init`` (a random model is never made by accident)."""
    check_timm_arch(name)
    pretrained = pretrained or "." in name  # ARCH.TAG names pretrained weights
    flags = {"a pretrained tag or --pretrained": pretrained, "--checkpoint": checkpoint is not None,
             "--random-init": random_init}  # fmt: skip
    chosen = [flag for flag, on in flags.items() if on]
    if len(chosen) != 1:
        problem = f"takes one source of weights, got {' and '.join(chosen)}" if chosen else "names no weights"
        raise UserError(f"timm:{name} {problem}: use timm:ARCH.TAG or --pretrained (timm's pretrained weights, "
                        "through the Hugging Face cache), --checkpoint FILE.safetensors, or --random-init")  # fmt: skip
    return load_timm(name, checkpoint, allow_pickle, kwargs, pretrained=pretrained)


def load_timm(name: str, checkpoint: str | Path | None = None, allow_pickle: bool = False, kwargs: dict | None = None,
              *, pretrained: bool = False) -> nn.Module:  # fmt: skip
    """``timm.create_model(name)`` with timm's pretrained weights, a checkpoint's, or else a seeded random init."""
    import timm

    kwargs = dict(kwargs or {})
    check_timm_arch(name)
    record = ConversionRecord(source={"arch": name, "kwargs": kwargs}, origin=f"timm:{name}")
    if pretrained:
        model = _timm_pretrained(name, kwargs)
        record.weights, record.revision = "pretrained", _timm_weights_commit(model)
    else:
        with torch.random.fork_rng():
            torch.manual_seed(0)  # a random-init source is the same model every time, so verify can rebuild it
            model = timm.create_model(name, pretrained=False, **kwargs)
        record.weights = "random init" if checkpoint is None else str(checkpoint)
    attach_record(model, record)  # exactly how it was created (the timm adapter rebuilds it from this), where from
    if checkpoint is not None:
        state = read_state_dict(checkpoint, allow_pickle)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            first = str(error).strip().splitlines()[:6]
            message = f"checkpoint {checkpoint} does not fit timm:{name} {kwargs}:\n" + "\n".join(first)
            raise UserError(message) from None
    return model


def check_timm_arch(name: str) -> None:
    import timm

    arch = name.split(".")[0]
    if not timm.is_model(arch):
        raise UserError(f"timm has no architecture {arch!r}; see timm.list_models()")


def _timm_pretrained(name: str, kwargs: dict) -> nn.Module:
    """timm's own loader (its hub cache, its filters for a changed head or input size), with errors that say what
    to do."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # an architecture timm knows with a tag it does not
        cfg = None
    if cfg is None:
        tags = timm.list_pretrained(f"{name.split('.')[0]}.*")
        instead = f"its tags: {', '.join(tags[:8])}" if tags else "use --checkpoint or --random-init"
        raise UserError(f"timm has no pretrained weights {name!r}; {instead}")
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except OSError as error:  # huggingface_hub's "not in the cache" and connection errors are OSErrors
        where = f"hf download {cfg.hf_hub_id}" if cfg.hf_hub_id else (cfg.url or "its URL")
        raise UserError(
            f"the pretrained weights of timm:{name} are not in the cache and cannot be fetched "
            f"({type(error).__name__}); fetch them once online ({where}) or use --checkpoint"
        ) from None


def _timm_weights_commit(model: nn.Module) -> str | None:
    """The hub commit the pretrained weights were read at (timm reads ``model.safetensors`` of ``hf_hub_id``)."""
    from .hub import cached_commit

    hub_id = (getattr(model, "pretrained_cfg", None) or {}).get("hf_hub_id")
    return cached_commit(hub_id, "model.safetensors") if hub_id else None


def load_hf_directory(path: str | Path, allow_pickle: bool = False,
                      dtype: torch.dtype | None = torch.float32) -> nn.Module:  # fmt: skip
    """A transformers model folder through its Auto classes, in ``dtype`` (None: as its config says)."""
    import transformers

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory: config.json is missing")
    has_safetensors = any(path.glob("*.safetensors"))
    if not has_safetensors and not allow_pickle:
        raise UserError(f"{path} holds no .safetensors weights; pickle weights are refused unless --allow-pickle")
    from .models import register

    register()  # a folder of upcycle's own model types (upcycle_lm, upcycle_bam) reads through the Auto classes
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (ValueError, OSError) as error:
        raise UserError(f"{path}/config.json cannot be read by transformers: {error}") from None
    model_class = _model_class(config)
    try:
        model, info = model_class.from_pretrained(
            path, dtype=dtype or "auto", use_safetensors=has_safetensors, output_loading_info=True
        )
    except Exception as error:  # transformers raises many types for damaged checkpoints
        raise UserError(f"cannot load {path}: {type(error).__name__}: {str(error).strip()[:400]}") from None
    problems = {key: info.get(key) for key in ("missing_keys", "mismatched_keys", "unexpected_keys") if info.get(key)}
    if problems.get("missing_keys") or problems.get("mismatched_keys"):
        raise UserError(f"the weights in {path} do not match its config.json: {_short(problems)}")
    attach_record(model, ConversionRecord.of_folder(path))  # its tokenizer files travel along
    return model


def _model_class(config):
    import transformers

    from .models import get_model_class

    for name in config.architectures or []:
        model_class = getattr(transformers, name, None) or get_model_class(name)
        if model_class is not None:
            return model_class
    return transformers.AutoModel


def _short(problems: dict) -> str:
    return "; ".join(f"{key}: {list(value)[:5]}" for key, value in problems.items())


def content_key(path: Path, chunk: int = 1 << 24) -> str:
    """A hash of the file's bytes (16 hex digits of SHA-256), read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()[:16]


def cache_gguf(gguf_file: str | Path) -> Path:
    """Dequantise a GGUF checkpoint with transformers once and cache it as a safetensors HF directory.

    The cache key is a hash of the file's content (not its path): a moved or copied file is found again, a changed
    one is converted again.
    """
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file} does not exist")
    target = cache_root() / "gguf" / f"{gguf_file.stem}-{content_key(gguf_file)}"
    if (target / "config.json").is_file():
        return target
    for module in ("gguf", "accelerate"):  # transformers needs both to dequantise; say so before it does
        require(module, extra="gguf", purpose=f"reading the GGUF checkpoint {gguf_file.name}")
    import transformers

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    except Exception as error:
        raise UserError(f"transformers cannot read {gguf_file}: {type(error).__name__}: {error}") from None
    # the weights are plain fp32 now; drop the GGUF quantizer marker so save_pretrained writes safetensors
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(target, overwrite=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target
