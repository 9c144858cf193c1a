"""Whole training runs through the CLI: exact resume after SIGKILL (with a damaged newest checkpoint), two
processes under torchrun matching one process, NaN loss handling and bad input."""

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import upcycle
from upcycle.sources import load_timm
from upcycle.train import TrainingDiverged, train

TINY_VIT = {"img_size": 8, "patch_size": 2, "in_chans": 1, "embed_dim": 48, "depth": 3, "num_heads": 3,
            "num_classes": 10}  # fmt: skip


def dense_dir(tmp_path: Path, **kwargs) -> Path:
    model = load_timm("vit_tiny_patch16_224", None, False, {**TINY_VIT, **kwargs})
    upcycle.save(model, tmp_path / "dense")
    return tmp_path / "dense"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "upcycle", *map(str, args)]


def train_args(source, out, steps, *extra):
    return ["train", source, "--data", "digits", "--steps", steps, "--batch-size", 64, "--out", out,
            "--set", "checkpoint_every=25", "--set", "log_every=5", "--set", "warmup=10", *extra]  # fmt: skip


def train_losses(out: Path) -> list[float]:
    with open(out / "metrics.csv") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle) if row["split"] == "train"]


def run(args, **kwargs):
    result = subprocess.run(cli(*args), capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_sigkill_then_resume_ends_with_the_same_weights(tmp_path):
    source = dense_dir(tmp_path)
    run(train_args(source, tmp_path / "straight", 150))

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(cli(*train_args(source, interrupted, 150)), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while len(list((interrupted / "checkpoints").glob("step-*"))) < 2 and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    checkpoints = sorted((interrupted / "checkpoints").glob("step-*"))
    assert len(checkpoints) >= 2 and not (interrupted / "model").exists(), "the run ended before it was killed"
    newest = checkpoints[-1] / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # damaged: resume must fall back

    resumed = run(train_args(source, interrupted, 150, "--resume"))
    assert "damaged" in resumed.stderr
    straight = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    again = load_file(interrupted / "model" / "model.safetensors")
    assert straight.keys() == again.keys()
    for name in straight:
        assert torch.equal(straight[name], again[name]), name
    assert train_losses(tmp_path / "straight") == train_losses(interrupted)


@pytest.mark.slow
@pytest.mark.dist
def test_two_processes_follow_the_one_process_loss_curve(tmp_path):
    source = dense_dir(tmp_path)
    run(train_args(source, tmp_path / "one", 20, "--set", "log_every=1"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531",
                "-m", "upcycle"]  # fmt: skip
    two_args = [*torchrun, *map(str, train_args(source, tmp_path / "two", 20, "--set", "log_every=1"))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(two_args, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert len(one) == len(two) == 20
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < 1e-4
    assert one[-1] < one[0]


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from upcycle.eval.tasks import ImageClassification

    original = ImageClassification.loss
    calls = {"n": 0}

    def failing_loss(self, model, batch, generator):
        calls["n"] += 1
        loss, metrics = original(self, model, batch, generator)
        return (loss * float("nan") if calls["n"] > 5 else loss), metrics

    monkeypatch.setattr(ImageClassification, "loss", failing_loss)
    model = load_timm("vit_tiny_patch16_224", None, False, TINY_VIT)
    message = (f"the loss became nan at step 6; the last good checkpoint in {tmp_path / 'checkpoints'} is kept (lower "
               "--lr, --set grad_clip=1.0, or check the data)")  # fmt: skip
    with pytest.raises(TrainingDiverged, match=f"^{re.escape(message)}$"):
        train(model, {"data": "digits", "steps": 20, "batch_size": 32, "checkpoint_every": 2}, tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir())[-1] == "step-00000004"


def test_bad_input(tmp_path, capsys):
    from upcycle.cli import main

    source = dense_dir(tmp_path)
    assert main(["train", str(source), "--data", "imagenet", "--steps", "2", "--out", str(tmp_path / "a")]) == 2
    assert "unknown dataset 'imagenet'" in capsys.readouterr().err
    wrong_head = dense_dir(tmp_path / "w", num_classes=5)
    assert main(["train", str(wrong_head), "--data", "digits", "--steps", "2", "--out", str(tmp_path / "b")]) == 2
    assert "predicts 5 classes but digits has 10" in capsys.readouterr().err
    args = [
        "train",
        str(source),
        "--data",
        "digits",
        "--steps",
        "2",
        "--batch-size",
        "16",
        "--out",
        str(tmp_path / "c"),
    ]
    assert main([*args, "--set", "checkpoint_every=1"]) == 0
    assert main(args) == 2
    assert "already holds checkpoints; pass --resume" in capsys.readouterr().err
    other = dense_dir(tmp_path / "o", embed_dim=24)  # checkpoints in c belong to a wider model
    assert main(["train", str(other), *args[2:], "--resume"]) == 2
    assert "do not match" in capsys.readouterr().err


@pytest.mark.parametrize(("epochs", "steps"), [(1.5, 3), (0.1, 1)])
def test_epochs_become_whole_steps_and_at_least_one(tmp_path, epochs, steps):
    """64 training examples in batches of 32: two steps an epoch; a part of an epoch rounds up to a whole step."""
    model = load_timm("vit_tiny_patch16_224", None, False, TINY_VIT)
    config = {"data": "digits", "epochs": epochs, "batch_size": 32, "data_options": {"max_samples": 64}}
    train(model, config, tmp_path, progress=False)
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert int(rows[-1].split(",")[0]) == steps


def test_a_finished_run_resumed_for_more_steps_replaces_its_final_model(tmp_path):
    config = {"data": "digits", "batch_size": 32, "checkpoint_every": 2, "data_options": {"max_samples": 64}}
    train(load_timm("vit_tiny_patch16_224", None, False, TINY_VIT), {**config, "steps": 2}, tmp_path, progress=False)
    model = load_timm("vit_tiny_patch16_224", None, False, TINY_VIT)
    summary = train(model, {**config, "steps": 4}, tmp_path, resume=True, progress=False)
    assert summary["steps"] == 4
    saved = upcycle.load(tmp_path / "model")
    torch.testing.assert_close(saved.state_dict(), model.state_dict())  # the longer run's weights, not the first's
