"""The training engine's parts: parameter groups, schedule, resumable sampler, freezing, EMA, checkpoints."""

import math
import warnings

import pytest
import torch
from torch import nn

import upcycle
from upcycle.config import load_train_config
from upcycle.train.checkpoint import latest_checkpoint, save_checkpoint
from upcycle.train.optim import build_optimizer, layer_ids, lr_multiplier, parameter_groups
from upcycle.train.sampler import ResumableBatchSampler
from upcycle.train.stages import EMA, apply_freeze

from ..conversion.tiny_models import build


def _config(**overrides):
    return load_train_config(data="digits", steps=10, **overrides)


def test_no_decay_on_norms_biases_and_embeddings_router_lr_scale():
    moe = upcycle.convert(build("vit"), "sparse_upcycling", num_experts=2, top_k=1, progress=False)
    groups = parameter_groups(moe, _config(router_lr_scale=0.1, weight_decay=0.05))
    by_name = {name: group for group in groups for name in group["names"]}
    assert by_name["blocks.0.norm1.weight"]["weight_decay"] == 0.0
    assert by_name["blocks.0.attn.qkv.bias"]["weight_decay"] == 0.0
    assert by_name["pos_embed"]["weight_decay"] == 0.0
    assert by_name["blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05
    assert by_name["blocks.1.mlp.moe.experts.w_up"]["weight_decay"] == 0.05
    assert by_name["blocks.1.mlp.moe.router.gate.weight"]["lr_scale"] == 0.1
    assert by_name["blocks.1.mlp.moe.experts.w_up"]["lr_scale"] == 1.0
    assert sum(len(g["params"]) for g in groups) == sum(1 for _ in moe.parameters())


def test_layer_decay_orders_depths():
    model = build("vit")  # 2 blocks
    depths, count = layer_ids(model)
    assert count == 2
    assert depths["patch_embed.proj.weight"] == 0 and depths["blocks.0.mlp.fc1.weight"] == 1
    assert depths["blocks.1.mlp.fc1.weight"] == 2 and depths["head.weight"] == 3
    groups = {n: g for g in parameter_groups(model, _config(layer_decay=0.5)) for n in g["names"]}
    assert groups["head.weight"]["lr_scale"] == 1.0
    assert groups["blocks.1.mlp.fc1.weight"]["lr_scale"] == 0.5
    assert groups["patch_embed.proj.weight"]["lr_scale"] == 0.125
    convnext_depths, convnext_count = layer_ids(build("convnext_linear"))  # stages of 1, 1, 2, 1 blocks
    assert convnext_count == 5 and convnext_depths["stages.2.blocks.1.mlp.fc1.weight"] == 4


def test_schedule_values():
    assert lr_multiplier(0, 100, 10, "cosine", 0.0) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, 10, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_multiplier(55, 100, 10, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_multiplier(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(55, 100, 10, "linear", 0.0) == pytest.approx(0.5)
    assert lr_multiplier(80, 100, 10, "constant", 0.0) == 1.0
    optimizer = build_optimizer(build("vit"), _config(lr=2e-3))
    assert {g["lr"] for g in optimizer.param_groups} == {2e-3}


def test_sampler_splits_global_batches_across_processes_and_resumes():
    single = ResumableBatchSampler(40, 8, seed=3)
    ranks = [ResumableBatchSampler(40, 8, seed=3, rank=r, world=2, grad_accum=2) for r in range(2)]
    for _ in range(7):  # crosses an epoch boundary (5 steps per epoch)
        expected = sorted(single.next_step()[0])
        parts = [index for sampler in ranks for micro in sampler.next_step() for index in micro]
        assert sorted(parts) == expected and len(set(parts)) == 8
    resumed = ResumableBatchSampler(40, 8, seed=3)
    resumed.load_state_dict(single.state_dict())
    assert resumed.next_step() == single.next_step()
    with pytest.raises(ValueError, match="divide evenly over 3 processes"):
        ResumableBatchSampler(40, 8, seed=0, world=3)
    with pytest.raises(ValueError, match="larger than the training split"):
        ResumableBatchSampler(4, 8, seed=0)


def epoch_orders(sampler: ResumableBatchSampler, epochs: int) -> list[list[int]]:
    """The example order of each of the next ``epochs`` epochs (one process, no accumulation)."""
    return [[i for _ in range(sampler.steps_per_epoch) for i in sampler.next_step()[0]] for _ in range(epochs)]


def test_sampler_draws_a_new_order_every_epoch_from_seed_and_epoch():
    orders = epoch_orders(ResumableBatchSampler(12, 4, seed=5), 4)
    assert all(sorted(order) == list(range(12)) for order in orders)  # every epoch visits every example once
    assert len({tuple(order) for order in orders}) == 4  # and in a different order
    assert orders == epoch_orders(ResumableBatchSampler(12, 4, seed=5), 4)  # deterministic
    assert orders[0] != epoch_orders(ResumableBatchSampler(12, 4, seed=6), 1)[0]  # the seed matters
    resumed = ResumableBatchSampler(12, 4, seed=5)
    resumed.load_state_dict({"epoch": 2, "step_in_epoch": 0})  # resuming at epoch 2 replays epoch 2's order
    assert epoch_orders(resumed, 2) == orders[2:]
    middle = ResumableBatchSampler(12, 4, seed=5)
    middle.load_state_dict({"epoch": 1, "step_in_epoch": 1})  # and mid-epoch, the rest of it
    assert [i for _ in range(2) for i in middle.next_step()[0]] == orders[1][4:]


def test_freeze_stages():
    moe = upcycle.convert(build("llama"), "sparse_upcycling", num_experts=2, top_k=1, progress=False)
    apply_freeze(moe, "all_but_routers")
    trainable = [n for n, p in moe.named_parameters() if p.requires_grad]
    assert trainable and all(".router." in n for n in trainable)
    moe = upcycle.convert(build("llama"), "sparse_upcycling", num_experts=2, top_k=1, progress=False)
    apply_freeze(moe, "experts")
    assert not any(p.requires_grad for n, p in moe.named_parameters() if ".experts." in n)
    assert all(p.requires_grad for n, p in moe.named_parameters() if ".experts." not in n)
    with pytest.raises(ValueError, match="has no router"):
        apply_freeze(build("llama"), "all_but_routers")


def test_ema_update():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    assert torch.allclose(ema.state_dict()["weight"], torch.full((1, 2), 0.1))


def test_checkpoints_keep_the_newest_and_skip_damaged_ones(tmp_path):
    model = nn.Linear(3, 2)
    for step in (2, 4, 6):
        with torch.no_grad():
            model.weight.fill_(step)
        save_checkpoint(tmp_path, step, model.state_dict(), {"note": step}, None, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000006"]
    assert latest_checkpoint(tmp_path).step == 6
    weights = tmp_path / "step-00000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # truncated
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint.step == 4 and checkpoint.trainer["note"] == 4
    assert torch.equal(checkpoint.model["weight"], torch.full((2, 3), 4.0))
    assert any("damaged" in str(w.message) for w in caught)
    assert math.isclose(float(checkpoint.model["weight"][0, 0]), 4.0)


def test_train_config_refusals():
    with pytest.raises(ValueError, match="exactly one of steps and epochs"):
        load_train_config(data="digits")
    with pytest.raises(ValueError, match="not divisible by grad_accum"):
        _config(batch_size=10, grad_accum=4)
    with pytest.raises(ValueError, match="ema is not supported with strategy fsdp"):
        _config(strategy="fsdp", ema=0.99)
    with pytest.raises(ValueError, match="strategy"):
        _config(strategy="zero3")


def test_auxiliary_losses_are_minimised_not_maximised(tmp_path):
    """With only the routers training and renormalised top-1 (weight 1: no task gradient reaches a router), the
    load-balancing loss alone moves them, and it must fall: it is added to the objective, not subtracted."""
    import csv

    import upcycle
    from upcycle.sources import load_timm
    from upcycle.train import train

    dense = load_timm("vit_tiny_patch16_224", None, False, {"img_size": 8, "patch_size": 2, "in_chans": 1,
                      "embed_dim": 48, "depth": 2, "num_heads": 3, "num_classes": 10})  # fmt: skip
    moe = upcycle.convert(dense, "sparse_upcycling", num_experts=4, top_k=1, router_init_std=1.0, seed=1,
                          progress=False)  # fmt: skip
    config = {"data": "digits", "steps": 20, "batch_size": 64, "lr": 3e-2, "warmup": 0, "freeze": "all_but_routers",
              "aux": {"load_balancing": 1.0, "z_loss": 0.0}, "log_every": 1}  # fmt: skip
    train(moe, config, tmp_path / "run", progress=False)
    with open(tmp_path / "run" / "metrics.csv") as handle:
        balance = [float(row["aux"]) for row in csv.DictReader(handle) if row["split"] == "train"]
    assert balance[-1] < balance[0] - 0.05, balance


def test_a_resumed_run_ends_with_the_weights_and_ema_of_an_uninterrupted_one(tmp_path, monkeypatch):
    """In process and small (the SIGKILL test of test_runs is slow): a run stopped after its step-2 checkpoint and
    resumed ends like the straight run, EMA included (the final model holds the EMA weights)."""
    import copy
    import shutil

    from safetensors.torch import load_file

    from upcycle.sources import load_timm
    from upcycle.train import train
    from upcycle.train.metrics_log import MetricsLog

    monkeypatch.setattr(MetricsLog, "plot", lambda self, metric: None)  # the curves are not what is tested here
    dense = load_timm("vit_tiny_patch16_224", None, False, {"img_size": 8, "patch_size": 4, "in_chans": 1,
                      "embed_dim": 16, "depth": 1, "num_heads": 2, "num_classes": 10})  # fmt: skip
    config = {"data": "digits", "steps": 4, "batch_size": 16, "lr": 1e-2, "warmup": 0, "ema": 0.5,
              "checkpoint_every": 2, "eval_batches": 1, "log_every": 1}  # fmt: skip
    out = tmp_path / "run"
    train(copy.deepcopy(dense), config, out, progress=False)
    straight = load_file(out / "model" / "model.safetensors")
    shutil.rmtree(out / "checkpoints" / "step-00000004")  # as if killed between the two checkpoints
    shutil.rmtree(out / "model")
    with pytest.raises(FileExistsError, match="--resume"):
        train(copy.deepcopy(dense), config, out, progress=False)
    train(copy.deepcopy(dense), config, out, resume=True, progress=False)
    resumed = load_file(out / "model" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight  # tied, as an LM head often is


def test_checkpoint_state_of_an_unsharded_model_holds_tied_tensors_once(tmp_path):
    from upcycle.train.sharding import full_model_state

    model = TiedLM()
    state = full_model_state(model)
    assert list(state) == ["embed.weight"]  # safetensors refuses two names for one storage
    save_checkpoint(tmp_path, 1, state, {}, None, keep=1)
    assert torch.equal(latest_checkpoint(tmp_path).model["embed.weight"], model.embed.weight)
