"""Carry a Hugging Face source's tokenizer files into saved and exported directories, so a user can load the
tokenizer next to the model (``AutoTokenizer.from_pretrained(out_dir)``) and ``generate`` straight away."""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn

from ..record import record_of

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)  # fmt: skip


def copy_tokenizer_files(model: nn.Module, directory: Path) -> list[str]:
    """Copy the tokenizer files of the folder the model was read from (its record's ``files``) into ``directory``."""
    record = record_of(model)
    origin = record.files if record is not None else None
    if origin is None:
        return []
    copied = []
    for name in TOKENIZER_FILES:
        source = Path(origin) / name
        if source.is_file():
            shutil.copy2(source, directory / name)
            copied.append(name)
    return copied
