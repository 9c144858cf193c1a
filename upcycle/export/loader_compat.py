"""What older loaders and llama.cpp's converter read from an exported Hugging Face checkpoint, beyond what
transformers v5 writes itself.

transformers v5 keeps RoPE settings only in ``rope_parameters`` and saves a fast tokenizer's class as
``TokenizersBackend``; transformers 4.x reads ``rope_theta`` at the top level of config.json and does not know
that tokenizer class, and llama.cpp's ``convert_hf_to_gguf.py`` loads both through whichever transformers is
installed next to it. So every Hugging Face export also carries:

- ``rope_theta`` at the top level of config.json (next to v5's ``rope_parameters``, which v5 keeps reading);
- ``num_experts_per_tok`` always, and any ``aliases`` the writer names (Qwen3-MoE's ``num_experts``, which v5
  saves as ``num_local_experts`` but transformers 4.x reads by its own name);
- ``tokenizer_class: PreTrainedTokenizerFast`` in a copied tokenizer_config.json when a ``tokenizer.json`` came
  with it: the class every transformers version builds from tokenizer.json alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FAST_TOKENIZER = "PreTrainedTokenizerFast"


def add_loader_fields(directory: Path, config: Any, aliases: dict[str, Any] | None = None) -> None:
    """Add the top-level fields older loaders read to ``directory/config.json`` (written by ``save_pretrained``)."""
    path = directory / "config.json"
    data = json.loads(path.read_text())
    theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    if theta is not None:
        data["rope_theta"] = theta
    data["num_experts_per_tok"] = config.num_experts_per_tok
    data.update(aliases or {})
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def portable_tokenizer_config(directory: Path) -> None:
    """Name the fast tokenizer class in a copied tokenizer_config.json when tokenizer.json is there to build it."""
    path = directory / "tokenizer_config.json"
    if not (path.is_file() and (directory / "tokenizer.json").is_file()):
        return
    data = json.loads(path.read_text())
    data["tokenizer_class"] = FAST_TOKENIZER
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
