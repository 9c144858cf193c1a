"""SOURCE as a hub id ``ORG/NAME[@REVISION]``: resolved through huggingface_hub's cache, recorded with its commit."""

import json

import pytest
import torch
from safetensors.torch import load_file

import upcycle
from upcycle.cli import main
from upcycle.errors import UserError
from upcycle.hub import parse_hub_id
from upcycle.sources import load_source

from .conftest import tiny_llama_folder


@pytest.mark.parametrize(("text", "parsed"), [
    ("org/name", ("org/name", None)), ("HuggingFaceTB/SmolLM2-135M@main", ("HuggingFaceTB/SmolLM2-135M", "main")),
    ("org/na.me-1@v1.0", ("org/na.me-1", "v1.0")), ("org/name@refs/pr/3", ("org/name", "refs/pr/3")),
    ("name", None), ("a/b/c", None), ("/abs/path", None), ("./rel/x", None), ("model.gguf", None),
])  # fmt: skip
def test_hub_id_form(text, parsed):
    assert parse_hub_id(text) == parsed


def test_hub_id_converts_and_verifies_from_the_cache(hub_cache, tmp_path, capsys):
    commit = hub_cache.seed("org/tiny-llama", tiny_llama_folder(tmp_path / "dense"))
    out = tmp_path / "moe"
    assert main(["convert", "org/tiny-llama", "--experts", "4", "--top-k", "2", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["origin"], config["revision"]) == ("org/tiny-llama", commit)
    assert main(["verify", str(out), "--against", f"org/tiny-llama@{commit}"]) == 0
    assert "within atol" in capsys.readouterr().out


def test_a_pinned_revision_reads_that_commit(hub_cache, tmp_path):
    old = hub_cache.seed("org/tiny-llama", tiny_llama_folder(tmp_path / "v1", seed=1), branch="v1")
    new = hub_cache.seed("org/tiny-llama", tiny_llama_folder(tmp_path / "v2", seed=2))
    assert old != new
    for revision, folder, commit in ((f"@{old}", "v1", old), ("@v1", "v1", old), ("", "v2", new)):
        model = load_source(f"org/tiny-llama{revision}")
        expected = load_file(tmp_path / folder / "model.safetensors")["model.embed_tokens.weight"]
        assert torch.equal(model.model.embed_tokens.weight, expected), revision
        assert upcycle.record_of(model).revision == commit


def test_a_local_path_wins_over_the_hub_id(hub_cache, tmp_path, monkeypatch):
    hub_cache.seed("org/tiny-llama", tiny_llama_folder(tmp_path / "hub-copy", seed=1))
    monkeypatch.chdir(tmp_path)
    tiny_llama_folder(tmp_path / "org" / "tiny-llama", seed=2)
    model = load_source("org/tiny-llama")
    local = load_file(tmp_path / "org" / "tiny-llama" / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(model.model.embed_tokens.weight, local)
    assert upcycle.record_of(model).revision is None


def test_a_missing_hub_id_fails_cleanly(hub_cache, tmp_path, capsys):
    out = tmp_path / "moe"
    assert main(["convert", "org/not-cached", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "org/not-cached is neither a local path nor in the Hugging Face cache" in error
    assert "hf download org/not-cached" in error and "Traceback" not in error
    assert not out.exists()
    with pytest.raises(UserError, match="hf download org/tiny --revision v9"):
        load_source("org/tiny@v9")


def test_a_hub_id_streams(hub_cache, tmp_path):
    commit = hub_cache.seed("org/tiny-llama", tiny_llama_folder(tmp_path / "dense"))
    out = tmp_path / "moe"
    assert main(["convert", "org/tiny-llama", "--stream", "--experts", "2", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["revision"] == commit
    moe, dense = upcycle.load(out), load_source("org/tiny-llama")
    assert upcycle.verify(moe, dense).passed()


def test_pickle_weights_are_fetched_only_when_accepted(hub_cache, tmp_path):
    folder = tiny_llama_folder(tmp_path / "dense")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    hub_cache.seed("org/pickled", folder)
    with pytest.raises(UserError, match=r"no \.safetensors weights; pickle weights are refused unless --allow-pickle"):
        load_source("org/pickled")
    model = load_source("org/pickled", allow_pickle=True)
    assert torch.equal(model.model.embed_tokens.weight, state["model.embed_tokens.weight"])
