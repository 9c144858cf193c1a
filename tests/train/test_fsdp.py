"""FSDP (``strategy: fsdp``) under torchrun with 2 CPU processes: the same loss curve and weights as 1 process at
the same global batch, with gradient accumulation, and a checkpoint written by a 1-process run resumes sharded."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import upcycle
from upcycle.pretrain import build_dense
from upcycle.train.sharding import repeated_blocks

from .test_runs import cli, run, train_losses

SMALL_LM = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2}  # fmt: skip


def lm_args(source, out, *extra):
    return ["train", source, "--data", "shakespeare", "--steps", 16, "--batch-size", 8, "--out", out,
            "--set", "seq_len=32", "--set", "grad_accum=2", "--set", "checkpoint_every=8", "--set", "log_every=1",
            "--set", "eval_batches=2", "--set", "lr=3e-3", *extra]  # fmt: skip


def torchrun(args, port: int):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port)]
    command = [*launcher, *cli(*args)[1:]]  # cli() starts with the interpreter; torchrun runs "-m upcycle"
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def assert_close_weights(a_dir, b_dir, atol=1e-5):
    a, b = (load_file(d / "model" / "model.safetensors") for d in (a_dir, b_dir))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol), name


def test_repeated_blocks_are_the_transformer_layers():
    model = build_dense("lm_tiny", **SMALL_LM)
    assert repeated_blocks(model) == list(model.model.layers)


def test_repeated_blocks_are_the_outermost_lists_of_one_class_with_parameters():
    from torch import nn

    from tests.conversion.tiny_models import build

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.inner = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])  # repeated, but inside a listed block

    model = nn.Module()
    model.stem = nn.Sequential(nn.Linear(4, 4), nn.ReLU())  # mixed classes
    model.acts = nn.ModuleList([nn.ReLU(), nn.ReLU()])  # one class, no parameters
    model.single = nn.ModuleList([Block()])  # one module is no repetition; the list inside its block is
    model.layers = nn.ModuleList([Block(), Block(), Block()])
    model.head = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    assert repeated_blocks(model) == [*model.single[0].inner, *model.layers, *model.head]  # in module order
    vit = build("vit")
    assert repeated_blocks(vit) == list(vit.blocks)
    convnext = build("convnext_linear")
    assert repeated_blocks(convnext) == list(convnext.stages)  # the stages, not the blocks inside them


@pytest.mark.slow
@pytest.mark.dist
def test_fsdp_matches_one_process_and_resumes_a_one_process_checkpoint(tmp_path):
    source = tmp_path / "dense"
    upcycle.save(build_dense("lm_tiny", **SMALL_LM), source)
    run(lm_args(source, tmp_path / "one"))
    torchrun(lm_args(source, tmp_path / "fsdp", "--set", "strategy=fsdp"), port=29541)
    one, fsdp = train_losses(tmp_path / "one"), train_losses(tmp_path / "fsdp")
    assert len(one) == len(fsdp) == 16 and one[-1] < one[0]
    assert max(abs(a - b) for a, b in zip(one, fsdp, strict=True)) < 1e-4
    assert_close_weights(tmp_path / "one", tmp_path / "fsdp")
    assert upcycle.load(tmp_path / "fsdp" / "model").config.hidden_size == 48  # the saved model is whole

    # The 1-process run's step-8 checkpoint (optimizer state keyed by name) continues sharded over 2 processes.
    mixed = tmp_path / "mixed"
    shutil.copytree(tmp_path / "one" / "checkpoints" / "step-00000008", mixed / "checkpoints" / "step-00000008")
    torchrun(lm_args(source, mixed, "--set", "strategy=fsdp", "--resume"), port=29542)
    assert max(abs(a - b) for a, b in zip(one[8:], train_losses(mixed), strict=True)) < 1e-4
    assert_close_weights(tmp_path / "one", mixed)
