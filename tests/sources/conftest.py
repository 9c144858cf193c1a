"""A temporary Hugging Face cache in the hub's own layout, seeded with tiny models, read with the network off.

``models--ORG--NAME/refs/<branch>`` holds a commit hash and ``snapshots/<commit>/`` the files, which is what
``huggingface_hub`` (and through it transformers and timm) reads when ``HF_HUB_OFFLINE`` is set (the test
configuration sets it).
"""

import hashlib
import shutil
from pathlib import Path

import pytest
import transformers

TINY_LLAMA = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}  # fmt: skip


class HubCache:
    def __init__(self, root: Path):
        self.root = root

    def seed(self, repo_id: str, folder: Path, branch: str = "main") -> str:
        """Put ``folder``'s files into the cache as a commit of ``repo_id`` that ``branch`` points to; its hash."""
        digest = hashlib.sha1()
        for file in sorted(folder.iterdir()):
            digest.update(file.name.encode() + file.read_bytes())
        commit = digest.hexdigest()
        repo = self.root / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(folder, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / branch).write_text(commit)
        return commit


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> HubCache:
    """An empty hub cache that huggingface_hub (hence transformers and timm) reads instead of the user's."""
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE, "the suite runs with HF_HUB_OFFLINE=1: nothing may reach the network"
    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    return HubCache(root)


def tiny_llama_folder(path: Path, seed: int = 0, dtype: str = "float32") -> Path:
    """A tiny Llama written by transformers' save_pretrained (safetensors), different weights per ``seed``."""
    import torch

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA))
    model.to(getattr(torch, dtype)).save_pretrained(path)
    return path
