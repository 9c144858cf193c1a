"""The tokenizer part of a GGUF file (``tokenizer.ggml.*``), from the ``tokenizer.json`` of the folder the model was
read from, as llama.cpp's converter writes a byte-level BPE vocabulary (``TextModel._set_vocab_gpt2``):

    tokenizer.ggml.model        "gpt2" (byte-level BPE)
    tokenizer.ggml.pre          "default": the converter names the pre-tokenizer by hashing the tokens of a probe
                                text against its own table of known tokenizers, which upcycle does not copy; llama.cpp
                                then splits text with its default BPE regex, which can differ from the source's on
                                digits, contractions and non-Latin scripts (convert the Hugging Face export with
                                convert_hf_to_gguf.py where that matters)
    tokenizer.ggml.tokens       every id below vocab_size, "[PAD{i}]" where the tokenizer has none
    tokenizer.ggml.token_type   CONTROL for special added tokens, USER_DEFINED for other added ones, else NORMAL
                                (UNUSED for the padding)
    merges, bos / eos / unk / pad ids, add_bos / add_eos, chat template: through ``gguf.SpecialVocab``, the
                                converter's own reader of tokenizer_config.json / tokenizer.json

Other tokenizer models (SentencePiece, WordPiece) are left out and named in the export note.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def add_vocab(gguf: Any, writer: Any, folder: str | None, vocab_size: int) -> str:
    """Write the vocabulary when ``folder`` holds a byte-level BPE tokenizer.json; say what was written."""
    path = Path(folder) / "tokenizer.json" if folder else None
    if path is None or not path.is_file():
        return "none: the model was not read from a folder with a tokenizer.json"
    tokenizer = json.loads(path.read_text())
    model = tokenizer.get("model", {})
    if model.get("type") != "BPE":
        return f"none: the tokenizer model is {model.get('type')!r}; only byte-level BPE is written"
    added = {token["id"]: token for token in tokenizer.get("added_tokens", [])}
    by_id = {i: text for text, i in model["vocab"].items()} | {i: token["content"] for i, token in added.items()}
    if max(by_id) >= vocab_size:
        return f"none: the tokenizer has ids up to {max(by_id)}, beyond the model's {vocab_size} embeddings"
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        if i not in by_id:
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(Path(folder), load_merges=True, n_vocab=vocab_size).add_to_gguf(writer)
    return f"gpt2 BPE, {len(by_id)} tokens, pre-tokenizer 'default'"
