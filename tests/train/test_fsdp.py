"""FSDP (``strategy: fsdp``) under torchrun with 2 CPU processes: the same loss curve and weights as 1 process at
the same global batch, with gradient accumulation, and a checkpoint written by a 1-process run resumes sharded. In
this process, over a process group of one: what wrap shards, gathered tensors and optimizer state, gradient sync."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from torch.distributed.tensor import DTensor

import upcycle
from upcycle.pretrain import build_dense
from upcycle.record import record_of
from upcycle.train import sharding
from upcycle.train.distributed import Context
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


def test_whether_a_list_holds_blocks_is_read_from_its_first_module():
    model = nn.Module()
    model.taken = nn.ModuleList([nn.LayerNorm(4), nn.LayerNorm(4, elementwise_affine=False)])
    model.skipped = nn.ModuleList([nn.LayerNorm(4, elementwise_affine=False), nn.LayerNorm(4)])
    assert repeated_blocks(model) == list(model.taken)


CPU = torch.device("cpu")
MAIN, OTHER = Context(0, 2, 0, CPU), Context(1, 2, 1, CPU)  # the processes of a run of two (wrap shards for them)


@pytest.fixture
def one_process_group():
    """A process group of this one process: FSDP and DDP shard, gather and reduce over it as over many (every shard
    is whole), with no other process to start."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if dist.is_initialized():  # a test may have torn it down itself
        dist.destroy_process_group()


def tiny_lm():
    torch.manual_seed(0)
    return build_dense("lm_tiny", **{**SMALL_LM, "hidden_size": 16, "intermediate_size": 32})


def test_fsdp_shards_every_layer_and_the_root_and_gathers_whole_tensors(one_process_group):
    model = tiny_lm()
    before, kind = {name: tensor.clone() for name, tensor in model.state_dict().items()}, type(model)
    assert sharding.wrap(model, "fsdp", Context(0, 1, 0, CPU)) is model and not sharding.is_sharded(model)  # alone
    assert sharding.wrap(model, "fsdp", MAIN) is model  # sharded in place
    assert sharding.is_sharded(model) and all(sharding.is_sharded(layer) for layer in model.model.layers)
    assert record_of(model) is not None  # recorded while whole, for the rebuild below
    state = sharding.full_model_state(model)
    assert state.keys() == before.keys()
    for name, tensor in state.items():
        assert type(tensor) is torch.Tensor and torch.equal(tensor, before[name]), name  # not DTensor shards
    whole = sharding.gathered_model(model, MAIN)
    assert whole is not model and not sharding.is_sharded(whole) and type(whole) is kind
    assert all(torch.equal(tensor, before[name]) for name, tensor in whole.state_dict().items())
    assert sharding.gathered_model(model, OTHER) is None  # it gathered too, but only the main process keeps a copy
    plain = tiny_lm()
    assert sharding.gathered_model(plain, MAIN) is plain and sharding.gathered_model(plain, OTHER) is None


def test_fsdp_optimizer_state_keyed_by_name_loads_back_as_shards(one_process_group):
    ids = torch.randint(0, 50, (2, 8))
    trained, fresh = tiny_lm(), tiny_lm()
    for model in (trained, fresh):
        sharding.wrap(model, "fsdp", MAIN)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-2)
    trained(input_ids=ids).logits.sum().backward()
    optimizer.step()
    state = sharding.full_optimizer_state(trained, optimizer)
    moments = state["state"]["model.layers.0.mlp.up_proj.weight"]
    assert type(moments["exp_avg"]) is torch.Tensor and moments["exp_avg"].shape == (32, 16)
    restored = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    sharding.load_optimizer_state(fresh, restored, state)
    assert all(isinstance(restored.state[p]["exp_avg"], DTensor) for p in fresh.parameters())  # the shards again
    for name, values in sharding.full_optimizer_state(fresh, restored)["state"].items():
        assert torch.equal(values["exp_avg_sq"], state["state"][name]["exp_avg_sq"]), name
    fresh(input_ids=ids).logits.sum().backward()
    restored.step()  # the next update runs on the restored shards


def test_gradients_are_reduced_only_on_the_last_micro_step(one_process_group):
    ids = torch.randint(0, 50, (2, 8))
    model = tiny_lm()
    sharding.wrap(model, "fsdp", MAIN)
    with sharding.gradient_sync(model, False):
        model(input_ids=ids).logits.sum().backward()
    assert all(p.grad is None for p in model.parameters())  # kept unsharded and unreduced until the last micro-step
    with sharding.gradient_sync(model, True):
        model(input_ids=ids).logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())  # the sync was switched back on
    replicated = tiny_lm()
    network = sharding.wrap(replicated, "ddp", MAIN)
    assert network.module is replicated and network.find_unused_parameters  # unselected experts get no gradient
    with sharding.gradient_sync(network, False):
        assert not network.require_backward_grad_sync
    with sharding.gradient_sync(network, True):
        assert network.require_backward_grad_sync


def test_sharded_weights_are_left_to_the_save_to_check(one_process_group, tmp_path):
    from upcycle.train.loop import TrainingDiverged, check_weights

    model, plain = tiny_lm(), tiny_lm()
    for each in (model, plain):
        with torch.no_grad():
            each.lm_head.weight[0, 0] = float("nan")
    sharding.wrap(model, "fsdp", MAIN)
    check_weights(model, 1, tmp_path)  # each process holds another shard: one stopping alone would hang the others
    with pytest.raises(TrainingDiverged):
        check_weights(plain, 1, tmp_path)


def test_setup_reads_torchrun_s_environment_and_creates_its_process_group(monkeypatch):
    from upcycle.train import distributed

    created, devices = [], []
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kwargs: created.append(kwargs))
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.setup("auto") == Context(0, 1, 0, CPU) and created == []  # one process: no group
    message = r"^device cuda was requested but no CUDA device is available$"
    with pytest.raises(ValueError, match=message):
        distributed.setup("cuda")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.setup("cpu") == Context(1, 2, 1, CPU) and created == [{"backend": "gloo"}] and devices == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = torch.device("cuda", 1)  # the process's own GPU, by its local rank
    assert distributed.setup("auto") == Context(1, 2, 1, gpu) and created[1:] == [{"backend": "nccl"}]
    assert devices == [gpu]
    assert distributed.setup("cpu").device == CPU and created[2:] == [{"backend": "gloo"}]  # GPUs there, not used


def test_setup_joins_a_process_group_already_there(one_process_group, monkeypatch):
    from upcycle.train import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert distributed.setup("auto") == MAIN  # init_process_group would refuse a second default group


def test_mean_across_averages_each_metric_over_the_processes(monkeypatch):
    from upcycle.train import distributed

    values, other = {"loss": 2.0, "accuracy": 0.5}, {"accuracy": 0.25, "loss": 4.0}

    def all_reduce(tensor):  # the sum with the other process's values, which it sends in the same (sorted) order
        tensor += torch.tensor([other[key] for key in sorted(other)], dtype=torch.float64)

    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    assert distributed.mean_across(values, Context(0, 1, 0, CPU)) is values  # one process: nothing to average
    assert distributed.mean_across(values, MAIN) == {"accuracy": 0.375, "loss": 3.0}
    other = {"loss": 0.2}
    assert distributed.mean_across({"loss": 0.1}, MAIN) == {"loss": (0.1 + 0.2) / 2}  # in double: float32 rounds 0.1


def test_barrier_and_teardown_act_for_a_run_of_several_processes_only(one_process_group, monkeypatch):
    from upcycle.train import distributed

    barriers = []
    monkeypatch.setattr(distributed.dist, "barrier", lambda: barriers.append("waited"))
    distributed.barrier(Context(0, 1, 0, CPU))
    assert barriers == []
    distributed.barrier(MAIN)
    assert barriers == ["waited"]
    distributed.teardown(Context(0, 1, 0, CPU))
    assert dist.is_initialized()
    distributed.teardown(MAIN)
    assert not dist.is_initialized()
    distributed.teardown(MAIN)  # already torn down: nothing left to destroy


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
