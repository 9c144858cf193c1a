"""The training engine's parts: parameter groups, schedule, resumable sampler, freezing, EMA, checkpoints."""

import json
import math
import pickle
import random
import re
import warnings

import pytest
import torch
import yaml
from torch import nn

import upcycle
from upcycle.config import load_train_config
from upcycle.train.checkpoint import latest_checkpoint, restore_rng_states, rng_states, save_checkpoint
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


def test_layer_decay_without_blocks_puts_the_head_one_above_the_embeddings():
    model = nn.Module()
    model.embeddings, model.head = nn.Embedding(5, 4), nn.Linear(4, 2)  # no blocks, layers, h nor stages
    depths, count = layer_ids(model)
    assert count == 0 and depths == {"embeddings.weight": 0, "head.weight": 1, "head.bias": 1}
    groups = {n: g for g in parameter_groups(model, _config(layer_decay=0.5)) for n in g["names"]}
    assert [groups[n]["lr_scale"] for n in depths] == [0.5, 1.0, 1.0]


def test_stage_sizes_are_read_from_the_highest_block_whatever_the_order():
    def stage(*indices):
        blocks = nn.ModuleDict({str(i): nn.Linear(2, 2, bias=False) for i in indices})
        return nn.ModuleDict({"blocks": blocks})

    model = nn.Module()
    model.stages = nn.ModuleList([stage(1, 0), stage(0)])  # stage 0's block 1 is registered before its block 0
    depths, count = layer_ids(model)
    assert count == 3
    assert depths == {"stages.0.blocks.1.weight": 2, "stages.0.blocks.0.weight": 1, "stages.1.blocks.0.weight": 3}


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
    with pytest.raises(ValueError, match=r"^batch size 8 must divide evenly over 3 processes × 1 accumulation steps$"):
        ResumableBatchSampler(40, 8, seed=0, world=3)
    with pytest.raises(ValueError, match=r"^batch size 8 is larger than the training split \(4 examples\)$"):
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


def test_sampler_orders_come_from_seed_and_epoch_and_batches_may_be_the_whole_split():
    sampler = ResumableBatchSampler(12, 4, seed=5)
    orders = epoch_orders(sampler, 2)
    for epoch, order in enumerate(orders):  # one permutation per (seed, epoch), as a checkpoint records them
        expected = torch.randperm(12, generator=torch.Generator().manual_seed(5 * 1_000_003 + epoch))
        assert order == expected.tolist()
    whole = ResumableBatchSampler(8, 8, seed=0)  # a batch as large as the split: one step an epoch
    assert whole.steps_per_epoch == 1 and sorted(whole.next_step()[0]) == list(range(8))
    with pytest.raises(ValueError, match=r"^batch size 6 must divide evenly over 2 processes × 2 accumulation steps$"):
        ResumableBatchSampler(12, 6, seed=0, world=2, grad_accum=2)


def test_freeze_stages():
    moe = upcycle.convert(build("llama"), "sparse_upcycling", num_experts=2, top_k=1, progress=False)
    apply_freeze(moe, "all_but_routers")
    trainable = [n for n, p in moe.named_parameters() if p.requires_grad]
    assert trainable and all(".router." in n for n in trainable)
    moe = upcycle.convert(build("llama"), "sparse_upcycling", num_experts=2, top_k=1, progress=False)
    apply_freeze(moe, "experts")
    assert not any(p.requires_grad for n, p in moe.named_parameters() if ".experts." in n)
    assert all(p.requires_grad for n, p in moe.named_parameters() if ".experts." not in n)
    with pytest.raises(
        ValueError, match=r"^freeze=all_but_routers, but the model has no router: convert it to an MoE first$"
    ):
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


def two_checkpoints(root):
    """Steps 2 and 4 of a Linear(3, 2) whose weights are filled with the step."""
    model = nn.Linear(3, 2)
    for step in (2, 4):
        with torch.no_grad():
            model.weight.fill_(step)
        save_checkpoint(root, step, model.state_dict(), {"note": step}, None, keep=2)
    return root / "step-00000002", root / "step-00000004"


def test_a_missing_file_is_named_in_a_warning_at_the_caller_and_the_previous_checkpoint_is_used(tmp_path, monkeypatch):
    older, newest = two_checkpoints(tmp_path)
    (newest / "trainer.pt").unlink()
    calls = []
    monkeypatch.setattr(warnings, "warn", lambda *args, **kwargs: calls.append((args, kwargs)))
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint.step == 2 and checkpoint.path == older and checkpoint.trainer["note"] == 2
    message = (f"checkpoint {newest} is damaged ({newest / 'trainer.pt'} does not match the manifest); falling back to "
               "the previous one")  # fmt: skip
    assert calls == [((message,), {"stacklevel": 2})]  # attributed to the code that asked for the checkpoint


def test_a_file_changed_in_place_is_caught_by_its_checksum(tmp_path):
    older, newest = two_checkpoints(tmp_path)
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the last weight's top byte: the same size, and the file still loads
    weights.write_bytes(bytes(data))
    message = (
        f"checkpoint {newest} is damaged ({weights} does not match the manifest); falling back to the previous one"
    )
    with pytest.warns(UserWarning, match=f"^{re.escape(message)}$"):
        checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint.path == older and torch.equal(checkpoint.model["weight"], torch.full((2, 3), 2.0))


class Note:
    """Not a tensor nor a plain container: loading it would run pickle's arbitrary-object path."""


def test_trainer_state_is_read_weights_only_whatever_the_environment_says(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # lifts torch.load's default, not an explicit True
    save_checkpoint(tmp_path, 1, {"weight": torch.zeros(2)}, {"note": Note()}, None, keep=1)
    with pytest.raises(pickle.UnpicklingError, match=r"^Weights only load failed"):
        latest_checkpoint(tmp_path)


def test_rng_states_restore_a_python_state_read_back_as_a_list():
    states = rng_states()
    expected = [random.random() for _ in range(3)], torch.rand(3)
    restore_rng_states({"torch": states["torch"], "python": list(states["python"])})  # not a tuple
    assert [random.random() for _ in range(3)] == expected[0] and torch.equal(torch.rand(3), expected[1])


def test_cuda_rng_states_are_saved_and_restored_only_where_cuda_is_available(monkeypatch):
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: ["gpu 0 state"])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with_cuda = rng_states()
    assert with_cuda["cuda"] == ["gpu 0 state"]
    restore_rng_states(with_cuda)
    assert restored == [["gpu 0 state"]]
    restore_rng_states({"torch": with_cuda["torch"], "python": with_cuda["python"]})  # saved on a CPU machine
    assert restored == [["gpu 0 state"]]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sorted(rng_states()) == ["python", "torch"]
    restore_rng_states(with_cuda)  # saved on a GPU machine, resumed on a CPU one: the CUDA states are left out
    assert restored == [["gpu 0 state"]]


def test_weights_made_non_finite_are_named_and_the_last_good_checkpoint_kept(tmp_path):
    from upcycle.train.loop import TrainingDiverged, check_weights

    model = nn.Linear(2, 2)
    check_weights(model, 3, tmp_path)  # finite: nothing to say
    with torch.no_grad():
        model.weight[0, 0], model.bias[1] = float("nan"), float("inf")
    message = (f"the weights became NaN or Inf at step 3 (weight, bias); nothing was saved for it and the last good "
               f"checkpoint in {tmp_path} is kept (lower --lr, --set grad_clip=1.0, or check the data)")  # fmt: skip
    with pytest.raises(TrainingDiverged, match=f"^{re.escape(message)}$"):
        check_weights(model, 3, tmp_path)


def test_seed_step_reseeds_every_generator_from_the_seed_the_step_and_the_rank():
    import numpy as np

    from upcycle.train.loop import seed_step

    value = (70_000 * 1_000_003 + 5) * 64 + 1  # over 2^32: numpy's seed takes it modulo 2^32
    generator = seed_step(70_000, 5, 1)
    assert torch.initial_seed() == value and generator.initial_seed() == value
    draws = random.random(), float(np.random.rand()), float(torch.rand(()))
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)
    assert draws == (random.random(), float(np.random.rand()), float(torch.rand(())))


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


def test_the_aux_objective_weighs_each_auxiliary_loss_and_logs_those_it_adds():
    from upcycle.layers import collect_aux_losses
    from upcycle.train.loop import _aux_objective

    torch.manual_seed(0)
    moe = upcycle.convert(build("vit"), "sparse_upcycling", num_experts=2, top_k=1, progress=False).train()
    moe(torch.randn(2, 3, 32, 32))
    aux = {name: float(value.detach()) for name, value in collect_aux_losses(moe).items()}
    assert sorted(aux) == ["load_balancing", "z_loss"] and all(value > 0 for value in aux.values())
    metrics = {"loss": 1.0}
    total = _aux_objective(moe, _config(load_balancing=0.5, z_loss=0.25), metrics)
    weighted = 0.5 * aux["load_balancing"] + 0.25 * aux["z_loss"]
    assert float(total.detach()) == pytest.approx(weighted)
    assert metrics == {"loss": 1.0, **aux, "aux": pytest.approx(weighted)}
    metrics = {}
    total = _aux_objective(moe, _config(load_balancing=0.0, z_loss=0.25), metrics)
    assert float(total.detach()) == pytest.approx(0.25 * aux["z_loss"])  # a coefficient of 0 leaves its loss out
    assert metrics == {"z_loss": aux["z_loss"], "aux": pytest.approx(0.25 * aux["z_loss"])}
    metrics = {}
    assert float(_aux_objective(build("vit"), _config(), metrics)) == 0.0 and metrics == {"aux": 0.0}  # no MoE


def test_router_fit_refuses_a_model_without_routers_to_fit_naming_the_methods_that_have_them():
    from upcycle.train.router_fit import RouterFit

    moe = upcycle.convert(build("vit"), "sparse_upcycling", num_experts=2, top_k=1, progress=False)  # top-k routers
    message = ("aux.router_fit > 0 fits routers to their experts' outputs, but this model has no such router; convert "
               "with method d2dmoe or moefication, or set router_fit to 0")  # fmt: skip
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        RouterFit(moe)


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
    message = f"{out} already holds checkpoints; pass --resume to continue or choose another --out"
    with pytest.raises(FileExistsError, match=f"^{re.escape(message)}$"):
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


def logged_run(model, config: dict, out, monkeypatch) -> tuple[dict, list[dict]]:
    """``train`` under a clock that advances half a second a reading (each logging window lasts half a second, so
    items_per_s is twice what the window trained on) and with curves named by metric, not drawn: (summary, rows)."""
    import csv
    import itertools
    import types

    from upcycle.train import loop, train
    from upcycle.train.metrics_log import MetricsLog

    clock = itertools.count()
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: next(clock) / 2))
    monkeypatch.setattr(MetricsLog, "plot", lambda self, metric: self.path.with_name(f"{metric}.png"))
    summary = train(model, config, out, progress=False)
    with open(out / "metrics.csv") as handle:
        return summary, list(csv.DictReader(handle))


def test_a_run_logs_every_log_every_steps_validates_every_eval_every_steps_and_saves_the_model(tmp_path, monkeypatch):
    from upcycle.sources import load_timm

    dense = load_timm("vit_tiny_patch16_224", None, False, {"img_size": 8, "patch_size": 4, "in_chans": 1,
                      "embed_dim": 16, "depth": 1, "num_heads": 2, "num_classes": 10})  # fmt: skip
    config = {"data": "digits", "steps": 5, "batch_size": 8, "log_every": 2, "eval_every": 2, "eval_batches": 1,
              "checkpoints": False, "lr": 1e-3, "warmup": 0, "schedule": "linear"}  # fmt: skip
    out = tmp_path / "run"
    summary, rows = logged_run(dense, config, out, monkeypatch)
    # a train row every 2 steps and at the end; validation with them, and the final one at the end (not twice)
    assert [(r["step"], r["split"]) for r in rows] == [("2", "train"), ("2", "val"), ("4", "train"), ("4", "val"),
                                                       ("5", "train"), ("5", "val")]  # fmt: skip
    train_rows, val_rows = rows[0::2], rows[1::2]
    assert [r["lr"] for r in train_rows] == ["0.0006", "0.0002", "0"]  # the LR the next step will use
    assert [r["items_per_s"] for r in train_rows] == ["32", "32", "16"]  # images: 8 a step
    assert all(r["aux"] == "0" and 0 <= float(r["accuracy"]) <= 1 and float(r["loss"]) > 0 for r in train_rows)
    assert all(r["lr"] == r["items_per_s"] == r["aux"] == "" and r["accuracy"] for r in val_rows)
    assert summary == {"steps": 5, "val": summary["val"], "out": str(out), "curves": str(out / "accuracy.png")}
    assert f"{summary['val']['accuracy']:.6g}" == val_rows[-1]["accuracy"]
    assert yaml.safe_load((out / "train.yaml").read_text())["train"]["eval_every"] == 2  # the run's whole config
    assert (out / "model" / "model.safetensors").is_file()
    assert not (out / "checkpoints").exists()


def test_a_run_clips_gradients_at_grad_clip_and_logs_the_share_of_zero_activations(tmp_path, monkeypatch):
    from upcycle.sources import load_timm

    clipped = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(
        torch.nn.utils, "clip_grad_norm_", lambda params, norm: clipped.append(norm) or clip(params, norm)
    )
    dense = load_timm("vit_tiny_patch16_224", None, False, {"img_size": 8, "patch_size": 4, "in_chans": 1,
                      "embed_dim": 16, "depth": 1, "num_heads": 2, "num_classes": 10})  # fmt: skip
    config = {"data": "digits", "steps": 2, "batch_size": 8, "log_every": 1, "eval_batches": 1, "checkpoints": False,
              "grad_clip": 0.5, "aux": {"sparsity": 1.0, "sparsity_kind": "l1"}}  # fmt: skip
    _, rows = logged_run(dense, config, tmp_path / "clipped", monkeypatch)
    assert clipped == [0.5, 0.5]  # once a step
    assert [r["split"] for r in rows] == ["train", "train", "val"]
    assert all(0 <= float(r["sparsity"]) < 1 for r in rows[:2]) and rows[2]["sparsity"] == ""
    _, rows = logged_run(dense, {**config, "grad_clip": None, "aux": {}}, tmp_path / "unclipped", monkeypatch)
    assert clipped == [0.5, 0.5]  # off: not called
    assert [r["sparsity"] for r in rows] == ["", "", ""]  # no penalty, no share measured


def test_a_language_model_run_counts_tokens_per_second_and_reports_perplexity(tmp_path, monkeypatch):
    from upcycle.pretrain import build_dense

    model = build_dense("lm_tiny", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1)  # fmt: skip
    config = {"data": "shakespeare", "steps": 2, "batch_size": 2, "seq_len": 16, "log_every": 2, "eval_batches": 1,
              "checkpoints": False}  # fmt: skip
    summary, rows = logged_run(model, config, tmp_path, monkeypatch)
    assert [(r["step"], r["split"], r["items_per_s"]) for r in rows] == [("2", "train", "128"), ("2", "val", "")]
    assert summary["curves"] == str(tmp_path / "perplexity.png") and float(rows[0]["perplexity"]) > 1


def test_checkpoint_state_of_an_unsharded_model_holds_tied_tensors_once(tmp_path):
    from upcycle.train.sharding import full_model_state

    model = TiedLM()
    state = full_model_state(model)
    assert list(state) == ["embed.weight"]  # safetensors refuses two names for one storage
    save_checkpoint(tmp_path, 1, state, {}, None, keep=1)
    assert torch.equal(latest_checkpoint(tmp_path).model["embed.weight"], model.embed.weight)


def test_metrics_log_rows_and_resume_keep_only_steps_up_to_the_resumed_one(tmp_path):
    import csv

    from upcycle.train.metrics_log import MetricsLog

    log = MetricsLog(tmp_path, enabled=True)
    for step in range(1, 5):
        log.log(step, "train", {"loss": 1 / 3 + step, "lr": 0.001, "unknown": 7.0})
    log.log(4, "val", {"loss": 2.0, "accuracy": 0.5})
    log.close()
    rows = log.rows()
    assert [(r["step"], r["split"]) for r in rows] == [("1", "train"), ("2", "train"), ("3", "train"), ("4", "train"),
                                                       ("4", "val")]  # fmt: skip
    assert rows[0]["loss"] == "1.33333" and rows[0]["lr"] == "0.001" and "unknown" not in rows[0]  # 6 digits
    resumed = MetricsLog(tmp_path, enabled=True, resume_step=2)
    assert [r["step"] for r in resumed.rows()] == ["1", "2"]  # the steps after the checkpoint are run again
    resumed.log(3, "train", {"loss": 9.0})
    resumed.close()
    with open(tmp_path / "metrics.csv") as handle:
        assert [row["loss"] for row in csv.DictReader(handle)] == ["1.33333", "2.33333", "9"]
    fresh = MetricsLog(tmp_path, enabled=True)  # a new run (no resume) starts an empty file
    fresh.close()
    assert fresh.rows() == []


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_metrics_log_writes_tensorboard_scalars_and_purges_the_steps_run_again(tmp_path):
    from upcycle.train.metrics_log import MetricsLog

    log = MetricsLog(tmp_path, enabled=True)
    for step in range(1, 4):
        log.log(step, "train", {"loss": float(step), "items_per_s": 8, "note": "text"})  # text is no scalar
    log.log(3, "val", {"accuracy": 0.5})
    log.close()
    resumed = MetricsLog(tmp_path, enabled=True, resume_step=1)  # steps 2 and 3 run again
    resumed.log(2, "train", {"loss": 20.0})
    resumed.close()
    assert tensorboard_scalars(tmp_path / "tb") == {
        "train/loss": [(1, 1.0), (2, 20.0)],
        "train/items_per_s": [(1, 8.0)],
        "val/accuracy": [],  # logged at step 3, after the resumed step: purged
    }


def test_metrics_log_without_tensorboard_warns_with_the_install_command_and_writes_the_csv(tmp_path, monkeypatch):
    from upcycle.train import metrics_log

    monkeypatch.setattr(metrics_log, "available", lambda module: module != "tensorboard")
    message = "TensorBoard logs are skipped, tensorboard is not installed: pip install 'upcycle[tensorboard]'"
    calls = []
    monkeypatch.setattr(warnings, "warn", lambda *args, **kwargs: calls.append((args, kwargs)))
    log = metrics_log.MetricsLog(tmp_path, enabled=True)
    assert calls == [((message,), {"stacklevel": 2})]  # attributed to the code that opened the log
    log.log(1, "train", {"loss": 0.5})
    log.close()
    assert log.writer is None and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]
    assert log.rows() == [{**dict.fromkeys(metrics_log.FIELDS, ""), "step": "1", "split": "train", "loss": "0.5"}]


def test_metrics_log_of_another_process_writes_nothing(tmp_path):
    from upcycle.train.metrics_log import MetricsLog

    log = MetricsLog(tmp_path, enabled=False)
    log.log(1, "train", {"loss": 1.0})
    assert not (tmp_path / "metrics.csv").exists() and log.plot("accuracy") is None


def test_curves_are_plotted_atomically(tmp_path):
    from upcycle.train.metrics_log import MetricsLog

    log = MetricsLog(tmp_path, enabled=True)
    assert log.plot("perplexity") is None  # nothing logged yet
    for step in (1, 2, 3):
        log.log(step, "train", {"loss": 3.0 - step, "perplexity": 20.0 - step})
    log.log(3, "val", {"loss": 1.5, "perplexity": 4.5})
    log.close()
    path = log.plot("perplexity")
    assert path == tmp_path / "curves.png" and path.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["curves.png", "metrics.csv"]


def test_ema_follows_floating_tensors_only_and_restores_its_state():
    model = nn.BatchNorm1d(2)  # running stats are floating; num_batches_tracked is an integer buffer
    ema = EMA(model, decay=0.5)
    assert "num_batches_tracked" not in ema.state_dict() and "running_mean" in ema.state_dict()
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)
    assert torch.equal(ema.state_dict()["weight"], torch.full((2,), 2.0))  # halfway from 1 to 3
    other = EMA(nn.BatchNorm1d(2), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.state_dict()["weight"], torch.full((2,), 2.0))
    ema.update(model)
    assert torch.equal(other.state_dict()["weight"], torch.full((2,), 2.0))  # a copy, not the same tensors


def test_freeze_on_a_moe_at_the_root_and_nothing_to_train():
    from upcycle.layers import Experts, MoE, TopKRouter

    moe = MoE(TopKRouter(4, 2, top_k=1), Experts(2, 4, 6))  # parameter names start "experts." / "router."
    apply_freeze(moe, "experts")
    assert {n for n, p in moe.named_parameters() if p.requires_grad} == {"router.gate.weight"}
    moe = MoE(TopKRouter(4, 2, top_k=1), Experts(2, 4, 6))
    apply_freeze(moe, "all_but_routers")
    assert {n for n, p in moe.named_parameters() if p.requires_grad} == {"router.gate.weight"}
    apply_freeze(moe, "none")
    assert {n for n, p in moe.named_parameters() if p.requires_grad} == {"router.gate.weight"}  # left as it was
    for param in moe.parameters():
        param.requires_grad_(False)
    with pytest.raises(
        ValueError, match=r"^no parameter requires gradients: the freeze setting left nothing to train$"
    ):
        build_optimizer(moe, _config())


def test_warmup_in_steps_or_as_a_share_of_the_run():
    from upcycle.train.optim import build_scheduler

    def first_lrs(warmup, steps=20, total=100):
        optimizer = build_optimizer(nn.Linear(2, 2), _config(lr=1.0, warmup=warmup, schedule="constant"))
        scheduler = build_scheduler(optimizer, total, _config(lr=1.0, warmup=warmup, schedule="constant"))
        lrs = []
        for _ in range(steps):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return lrs

    assert first_lrs(0.1)[:11] == pytest.approx([(i + 1) / 10 for i in range(10)] + [1.0])  # 10% of 100 steps
    assert first_lrs(4)[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])  # 4 steps
    assert first_lrs(1)[:2] == pytest.approx([1.0, 1.0])  # 1 is one step, not the whole run
    assert first_lrs(0)[0] == 1.0
    assert lr_multiplier(100, 100, 0, "linear", 0.2) == pytest.approx(0.2)
    assert lr_multiplier(150, 100, 0, "cosine", 0.2) == pytest.approx(0.2)  # past the end: the floor


def test_sparsity_ramp():
    from upcycle.train.sparsity import ramp

    assert ramp(0, 100, 0.0) == 1.0
    assert [ramp(step, 100, 0.1) for step in (0, 4, 9, 50)] == pytest.approx([0.1, 0.5, 1.0, 1.0])
    assert ramp(0, 3, 0.1) == 1.0  # fewer ramp steps than one: full strength at once


@pytest.mark.parametrize("kind", ["hoyer", "l1"])
def test_sparsity_penalty_averages_each_ffn_activation(kind):
    from upcycle.adapters import adapter_of, find_adapter
    from upcycle.layers.losses import hoyer_sparsity, l1_sparsity
    from upcycle.train.sparsity import SparsityPenalty, activation_modules

    model = build("vit")
    adapter = find_adapter(model)
    seen = []
    for module in activation_modules(model, adapter).values():
        module.register_forward_hook(lambda m, i, output: seen.append(output))
    penalty = SparsityPenalty(model, adapter, kind)
    assert penalty.take()[0] == 0.0  # nothing ran yet
    model(torch.randn(2, 3, 32, 32))
    value, zeros = penalty.take()
    measure = hoyer_sparsity if kind == "hoyer" else l1_sparsity
    expected = torch.stack([measure(a) for a in seen]).mean()
    assert len(seen) == 2 and float(value.detach()) == pytest.approx(float(expected.detach()))
    assert zeros == sum(int((a == 0).sum()) for a in seen) / sum(a.numel() for a in seen)
    assert penalty.take()[0] == 0.0  # taken: cleared
    penalty.close()
    model(torch.randn(1, 3, 32, 32))
    assert penalty.outputs == []  # hooks removed
    moe = upcycle.convert(build("vit"), "sparse_upcycling", num_experts=2, top_k=1, layers="all", progress=False)
    with pytest.raises(
        ValueError, match=r"^activation sparsity needs dense FFNs with an activation module; this model has none$"
    ):
        SparsityPenalty(moe, adapter_of(moe), kind)


def test_sparsity_penalty_counts_the_real_tokens_only():
    from upcycle.adapters import find_adapter
    from upcycle.layers import real_tokens
    from upcycle.layers.losses import l1_sparsity
    from upcycle.train.sparsity import SparsityPenalty, activation_modules

    torch.manual_seed(0)
    model = build("bert").eval()
    adapter = find_adapter(model)
    seen = []
    for module in activation_modules(model, adapter).values():
        module.register_forward_hook(lambda m, i, output: seen.append(output.relu()))  # relu: some exact zeros
        module.register_forward_hook(lambda m, i, output: output.relu())  # what the penalty then sees
    penalty = SparsityPenalty(model, adapter, "l1")
    value, zeros = penalty.take()
    assert float(value) == 0.0 and math.isnan(zeros)  # nothing ran: no share of zeros to report
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad(), real_tokens(mask):
        model(input_ids=torch.randint(1, 50, (2, 5)), attention_mask=mask)
    value, zeros = penalty.take()
    real = [a.reshape(10, -1)[mask.reshape(-1).bool()] for a in seen]  # 8 real tokens of 10
    assert len(real) == 3 and real[0].shape[0] == 8  # one per layer
    assert float(value) == pytest.approx(float(torch.stack([l1_sparsity(a) for a in real]).mean()))
    assert zeros == sum(int((a == 0).sum()) for a in real) / sum(a.numel() for a in real)
    penalty.close()


def test_gradient_accumulation_logs_the_mean_over_micro_batches(tmp_path, monkeypatch):
    """One step over the same 32 examples, whole or as two micro-batches of 16: the logged loss and accuracy are
    the batch's (the mean over micro-batches of equal size), and every row carries the throughput."""
    import copy
    import csv

    from upcycle.sources import load_timm
    from upcycle.train import train
    from upcycle.train.metrics_log import MetricsLog

    monkeypatch.setattr(MetricsLog, "plot", lambda self, metric: None)
    dense = load_timm("vit_tiny_patch16_224", None, False, {"img_size": 8, "patch_size": 4, "in_chans": 1,
                      "embed_dim": 16, "depth": 1, "num_heads": 2, "num_classes": 10})  # fmt: skip
    rows = {}
    for accumulation in (1, 2):
        config = {"data": "digits", "steps": 1, "batch_size": 32, "grad_accum": accumulation, "checkpoints": False,
                  "eval_batches": 1, "log_every": 1}  # fmt: skip
        train(copy.deepcopy(dense), config, tmp_path / str(accumulation), progress=False)
        with open(tmp_path / str(accumulation) / "metrics.csv") as handle:
            rows[accumulation] = next(row for row in csv.DictReader(handle) if row["split"] == "train")
    for key in ("loss", "accuracy"):
        assert float(rows[2][key]) == pytest.approx(float(rows[1][key]), abs=1e-5), key
    assert float(rows[1]["items_per_s"]) > 0 and float(rows[2]["items_per_s"]) > 0


def test_a_checkpoint_is_written_in_a_readable_layout_and_replaces_one_of_the_same_step(tmp_path):
    """safetensors files marked as PyTorch tensors (what other readers expect), an indented manifest, and a step
    written again (a resumed run re-saving it) replacing the old one instead of failing."""
    from safetensors import safe_open

    state, ema = {"weight": torch.ones(2)}, {"weight": torch.full((2,), 3.0)}
    path = save_checkpoint(tmp_path, 4, state, {"note": 1}, ema, keep=2)
    for name in ("model.safetensors", "ema.safetensors"):
        with safe_open(str(path / name), "pt") as file:
            assert file.metadata() == {"format": "pt"}
    manifest = json.loads((path / "manifest.json").read_text())
    assert (path / "manifest.json").read_text() == json.dumps(manifest, indent=2) + "\n"
    again = save_checkpoint(tmp_path, 4, {"weight": torch.zeros(2)}, {"note": 2}, None, keep=2)
    assert again == path and latest_checkpoint(tmp_path).trainer["note"] == 2
    assert latest_checkpoint(tmp_path).ema is None and torch.equal(latest_checkpoint(tmp_path).model["weight"],
                                                                   torch.zeros(2))  # fmt: skip


def test_every_vector_parameter_is_left_undecayed_and_plain_tensors_take_the_fused_adamw():
    """Gains and offsets are vectors whatever their name; only matrices (and larger) are decayed."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.register_parameter("gain", torch.nn.Parameter(torch.ones(4)))  # a vector with no hint in its name
    by_name = {name: group for group in parameter_groups(model, _config(weight_decay=0.05)) for name in group["names"]}
    assert by_name["gain"]["weight_decay"] == 0.0 and by_name["0.weight"]["weight_decay"] == 0.05
    assert build_optimizer(model, _config()).defaults["fused"] is True  # one kernel per step on plain tensors


def test_metrics_log_writes_integers_whole_and_floats_to_six_digits(tmp_path):
    from upcycle.train.metrics_log import MetricsLog

    log = MetricsLog(tmp_path, enabled=True)
    log.log(1, "train", {"items_per_s": 12345678, "loss": 12345678.0})
    log.close()
    assert (log.rows()[0]["items_per_s"], log.rows()[0]["loss"]) == ("12345678", "1.23457e+07")
