"""Resolve a SOURCE string to a dense (or saved MoE) model. Nothing is fetched from a model hub.

    DIR                  a Hugging Face model directory (config.json + safetensors)
    FILE.gguf            a GGUF checkpoint, dequantised by transformers once and cached as safetensors
    timm:ARCH            a timm architecture: a fixed (seeded) random init, or ``checkpoint=`` a safetensors state dict
    DIR (upcycle save)   a directory written by ``upcycle.save`` (config.json holds an upcycle record)

Checkpoints are read from safetensors; pickle files (``.bin``, ``.pt``, ``.pth``) are refused unless the caller
opts in with ``allow_pickle`` and are then read with ``torch.load(weights_only=True)``. Every loaded tensor is
checked to be finite.
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
                timm_kwargs: dict | None = None) -> nn.Module:  # fmt: skip
    """The model a SOURCE string names, in eval mode, fp32 unless the source says otherwise."""
    source = str(source)
    if source.startswith("timm:"):
        model = load_timm(source[len("timm:") :], checkpoint, allow_pickle, timm_kwargs or {})
    elif checkpoint is not None:
        raise UserError("--checkpoint goes with a timm:ARCH source only")
    elif source.endswith(".gguf"):
        model = load_hf_directory(cache_gguf(source))
        record_of(model).origin = source  # read from the dequantised copy, which holds its tokenizer files
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"source {source} does not exist (expected a directory, a .gguf file or timm:ARCH)")
        if not path.is_dir():
            raise UserError(f"source {source} is a file; give a model directory, a .gguf file or timm:ARCH")
        if is_upcycle_directory(path):
            from .export import load

            return load(path)
        model = load_hf_directory(path, allow_pickle)
    check_finite(model, f"the source {source}")
    return model.eval()


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


def load_timm(arch: str, checkpoint: str | Path | None, allow_pickle: bool, kwargs: dict) -> nn.Module:
    import timm

    if not timm.is_model(arch):
        raise UserError(f"timm has no architecture {arch!r}; see timm.list_models()")
    with torch.random.fork_rng():
        torch.manual_seed(0)  # a random-init source is the same model every time, so verify can rebuild it
        model = timm.create_model(arch, pretrained=False, **kwargs)
    # exactly how it was created (the timm adapter rebuilds it from this), and where from
    attach_record(model, ConversionRecord(source={"arch": arch, "kwargs": dict(kwargs)}, origin=f"timm:{arch}"))
    if checkpoint is not None:
        state = read_state_dict(checkpoint, allow_pickle)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            first = str(error).strip().splitlines()[:6]
            raise UserError(
                f"checkpoint {checkpoint} does not fit timm:{arch} {kwargs}:\n" + "\n".join(first)
            ) from None
    return model


def load_hf_directory(path: str | Path, allow_pickle: bool = False) -> nn.Module:
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
            path, dtype=torch.float32, use_safetensors=has_safetensors, output_loading_info=True
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


def cache_gguf(gguf_file: str | Path) -> Path:
    """Dequantise a GGUF checkpoint with transformers once and cache it as a safetensors HF directory.

    The cache key is the file's name, size and modification time, so a changed file is converted again.
    """
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file} does not exist")
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root() / "gguf" / f"{gguf_file.stem}-{key}"
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
