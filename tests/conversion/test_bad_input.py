"""Bad input gets a clear error and leaves no output directory behind (issue: conversion, "Bad input")."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import upcycle
from upcycle.cli import main
from upcycle.record import record_of

from .tiny_models import build


@pytest.fixture
def llama_dir(tmp_path):
    path = tmp_path / "llama"
    build("llama").save_pretrained(path)
    return path


def _convert(capsys, *args):
    code = main(["convert", *map(str, args)])
    return code, capsys.readouterr().err


def _assert_refused(capsys, out, *args, match):
    code, err = _convert(capsys, *args, "--out", out)
    assert code == 2, err
    assert match in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no partial temp dir


def test_missing_weights_file(llama_dir, tmp_path, capsys):
    (llama_dir / "model.safetensors").unlink()
    _assert_refused(capsys, tmp_path / "out", llama_dir, match="holds no .safetensors weights")


def test_truncated_weights_file(llama_dir, tmp_path, capsys):
    weights = llama_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _assert_refused(capsys, tmp_path / "out", llama_dir, match="cannot load")


def test_config_that_does_not_match_the_weights(llama_dir, tmp_path, capsys):
    config = json.loads((llama_dir / "config.json").read_text())
    config["intermediate_size"] = 48
    (llama_dir / "config.json").write_text(json.dumps(config))
    _assert_refused(capsys, tmp_path / "out", llama_dir, match="cannot load")


def test_unknown_architecture(tmp_path, capsys):
    _assert_refused(capsys, tmp_path / "out", "timm:resnet18", "--random-init", match="timm ResNet has no FFN")
    _assert_refused(capsys, tmp_path / "out", "timm:test_maxvit", "--random-init", match="no adapter supports")
    _assert_refused(capsys, tmp_path / "out", "timm:no_such_net", match="timm has no architecture 'no_such_net'")


def test_experts_that_do_not_divide_the_hidden_size(llama_dir, tmp_path, capsys):
    _assert_refused(capsys, tmp_path / "out", llama_dir, "--method", "neuron_split", "--experts", "5",
                    "--top-k", "5", match="5 experts do not divide the FFN hidden size 64")  # fmt: skip


def test_top_k_larger_than_experts(llama_dir, tmp_path, capsys):
    _assert_refused(capsys, tmp_path / "out", llama_dir, "--experts", "4", "--top-k", "6",
                    match="top_k=6 is larger than the 4 experts")  # fmt: skip


def test_nan_and_inf_weights(llama_dir, tmp_path, capsys):
    state = load_file(llama_dir / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(state, llama_dir / "model.safetensors", metadata={"format": "pt"})
    _assert_refused(capsys, tmp_path / "out", llama_dir, match="contains NaN or Inf")


def test_existing_output_directory_needs_overwrite(llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _convert(capsys, llama_dir, "--out", out)
    assert code == 2 and "already exists" in err
    assert (out / "keep.txt").read_text() == "mine"
    code, err = _convert(capsys, llama_dir, "--out", out, "--overwrite", "--experts", "2", "--top-k", "1")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_pickle_checkpoint_refused_unless_opted_in(tmp_path, capsys):
    arch, kwargs = "vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48,
                                             "num_heads": 3}  # fmt: skip
    dense = upcycle.sources.load_timm(arch, None, False, kwargs)
    checkpoint = tmp_path / "vit.pt"
    torch.save(dense.state_dict(), checkpoint)
    with pytest.raises(ValueError, match=r"is a pickle file.*--allow-pickle"):
        upcycle.sources.load_timm(arch, checkpoint, False, kwargs)
    loaded = upcycle.sources.load_timm(arch, checkpoint, True, kwargs)
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), dense.state_dict().values(), strict=True)
    )
    _assert_refused(capsys, tmp_path / "out", "timm:vit_tiny_patch16_224", "--checkpoint", checkpoint,
                    match="is a pickle file")  # fmt: skip


def test_checkpoint_from_another_model(tmp_path):
    state = {"weight": torch.zeros(3)}
    save_file(state, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="does not fit timm:vit_tiny_patch16_224"):
        upcycle.sources.load_timm("vit_tiny_patch16_224", tmp_path / "other.safetensors", False, {})


def test_load_refuses_damaged_directories(tmp_path):
    moe = upcycle.convert(build("gpt2"), "sparse_upcycling", num_experts=2, top_k=1, progress=False)
    upcycle.save(moe, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        upcycle.load(tmp_path / "m")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="weights missing"):
        upcycle.load(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="not an upcycle model directory"):
        upcycle.load(tmp_path)


def test_save_refuses_what_cannot_be_rebuilt(tmp_path):
    dense = build("vit")
    record_of(dense).source = {"arch": record_of(dense).source["arch"], "kwargs": {"num_classes": 5}}  # wrong sizes
    moe = upcycle.convert(dense, "sparse_upcycling", num_experts=2, top_k=1, progress=False)
    with pytest.raises(ValueError, match=r"(?s)cannot be rebuilt from its record.*load the dense model with upcycle"):
        upcycle.save(moe, tmp_path / "m")
    assert not (tmp_path / "m").exists()
