"""The training loop every model shares: dense pre-training, MoE fine-tuning, router-only and sparsity stages.

Determinism: before each optimizer step every random generator is reseeded from (seed, step, rank), and the data
order comes from a resumable sampler, so a run interrupted at any point and resumed from its last checkpoint ends
with exactly the weights of an uninterrupted run. The same code runs under ``torchrun`` with DDP or FSDP
(``strategy``).
"""

from __future__ import annotations

import gc
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import adapter_of
from ..config import TrainConfig, load_train_config, to_yaml
from ..data.batches import batches, held_out_batches
from ..errors import RunFailed, first_non_finite
from ..eval.tasks import make_task
from ..export.saving import load_weights
from ..layers import collect_aux_losses, update_expert_biases
from . import distributed, sharding
from .checkpoint import latest_checkpoint, restore_rng_states, save_checkpoint
from .memory import large_blocks_mapped
from .metrics_log import MetricsLog
from .optim import build_optimizer, build_scheduler
from .router_fit import RouterFit
from .sampler import ResumableBatchSampler
from .sparsity import SparsityPenalty, ramp
from .stages import EMA, apply_freeze, set_training_modes


class TrainingDiverged(RunFailed, RuntimeError):
    """The loss or the weights became NaN / Inf; the run stops before saving them (still a RuntimeError, as before)."""


def check_weights(model: nn.Module, step: int, checkpoints: Path) -> None:
    """Refuse to checkpoint or save weights that an update made non-finite (the loss of the step was still finite).

    Sharded (FSDP) weights are checked by ``save`` once gathered: each process here holds a different shard, and
    one process stopping alone would leave the others waiting."""
    if sharding.is_sharded(model):
        return
    bad = first_non_finite(model.state_dict().items())
    if bad:
        raise TrainingDiverged(
            f"the weights became NaN or Inf at step {step} ({', '.join(bad)}); nothing was saved for it and the last "
            f"good checkpoint in {checkpoints} is kept (lower --lr, --set grad_clip=1.0, or check the data)"
        )


def seed_step(seed: int, step: int, rank: int) -> torch.Generator:
    """Reseed every generator for this step; returns a generator for batch-level randomness (Mixup)."""
    value = (seed * 1_000_003 + step) * 64 + rank
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value % 2**32)
    return torch.Generator().manual_seed(value)


def train(model: nn.Module, config: TrainConfig | dict | str | Path, out: str | Path, resume: bool = False,
          progress: bool = True, on_eval: Callable[[nn.Module, int], None] | None = None,
          **overrides) -> dict:  # fmt: skip
    """Train ``model`` in place; checkpoints, metrics and the final model go to ``out``. Returns a summary.

    ``on_eval(model, step)``: extra measurements (a benchmark's per-domain curves) before the first step of a fresh
    run and at every validation point, in eval mode under the run's autocast, without grad; modes restored."""
    cfg = load_train_config(config, **overrides)
    out = Path(out)
    context = distributed.setup(cfg.device)
    try:
        with large_blocks_mapped(model):
            return _run(model, cfg, out, resume, progress, context, on_eval)
    finally:
        distributed.teardown(context)


def _run(model, cfg: TrainConfig, out: Path, resume: bool, progress: bool, context, on_eval=None) -> dict:
    adapter = adapter_of(model)
    task = make_task(model, adapter, cfg)
    train_set, val_set = task.dataset("train"), task.dataset("val")
    sampler = ResumableBatchSampler(len(train_set), cfg.batch_size, cfg.seed, context.rank, context.world,
                                    cfg.grad_accum)  # fmt: skip
    total = cfg.steps or max(1, math.ceil(cfg.epochs * sampler.steps_per_epoch))

    checkpoints = out / "checkpoints"
    if not resume and checkpoints.exists() and any(checkpoints.glob("step-*")):
        raise FileExistsError(f"{out} already holds checkpoints; pass --resume to continue or choose another --out")
    apply_freeze(model, cfg.freeze)
    model.to(context.device)
    aux = cfg.aux
    sparsity = SparsityPenalty(model, adapter, aux.sparsity_kind, aux.sparsity_mean) if aux.sparsity else None
    router_fit = RouterFit(model) if cfg.aux.router_fit else None
    checkpoint = latest_checkpoint(checkpoints) if resume else None
    if checkpoint is not None:  # weights go in before sharding; a checkpoint of another model fails clearly
        load_weights(model, checkpoint.model, checkpoint.path)
    network = sharding.wrap(model, cfg.strategy, context)
    optimizer = build_optimizer(model, cfg)  # after wrap: under FSDP it must hold the shards
    scheduler = build_scheduler(optimizer, total, cfg)
    ema = EMA(model, cfg.ema) if cfg.ema else None

    start = 0
    if checkpoint is not None:
        sharding.load_optimizer_state(model, optimizer, checkpoint.trainer["optimizer"])
        scheduler.load_state_dict(checkpoint.trainer["scheduler"])
        sampler.load_state_dict(checkpoint.trainer["sampler"])
        restore_rng_states(checkpoint.trainer["rng"])
        if ema is not None and checkpoint.ema is not None:
            ema.load_state_dict(checkpoint.ema)
        start = checkpoint.step
    if context.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train.yaml").write_text(to_yaml(cfg, "train"))
    log = MetricsLog(out, context.is_main, resume_step=start)
    autocast = torch.autocast(context.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    bar = tqdm(range(start, total), initial=start, total=total, disable=not (progress and context.is_main),
               desc="train", unit="step", dynamic_ncols=True)  # fmt: skip
    if on_eval is not None and start == 0:  # before the throughput window opens
        _measure(model, on_eval, 0, autocast)
    window: dict[str, list[float]] = {}
    window_start, window_items = time.perf_counter(), 0
    set_training_modes(model, cfg.freeze)
    for step in bar:
        micro_batches = batches(train_set, sampler.next_step(), context.device, seed=(cfg.seed + 1) * 1_000_003 + step)
        generator = seed_step(cfg.seed, step, context.rank)  # after fetching: dropout, noise and Mixup per process
        optimizer.zero_grad(set_to_none=True)
        step_metrics: dict[str, float] = {}
        for i, batch in enumerate(micro_batches):
            sync = i == len(micro_batches) - 1
            with sharding.gradient_sync(network, sync), autocast:
                loss, metrics = task.loss(network, batch, generator)
                objective = loss + _aux_objective(model, cfg, metrics)
                if sparsity is not None:
                    penalty, zeros = sparsity.take()
                    objective = objective + cfg.aux.sparsity * ramp(step, total, cfg.aux.sparsity_ramp) * penalty
                    metrics.update(sparsity=zeros)
                if router_fit is not None:
                    fit = router_fit.take()
                    objective = objective + cfg.aux.router_fit * fit
                    metrics.update(router_fit=float(fit.detach()))
            (objective / len(micro_batches)).backward()
            metrics["loss"] = float(loss.detach())
            for key, value in metrics.items():
                step_metrics[key] = step_metrics.get(key, 0.0) + value / len(micro_batches)
        if not math.isfinite(step_metrics["loss"]):
            raise TrainingDiverged(
                f"the loss became {step_metrics['loss']} at step {step + 1}; the last good checkpoint in "
                f"{checkpoints} is kept (lower --lr, --set grad_clip=1.0, or check the data)"
            )
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        update_expert_biases(model)  # aux-loss-free balancing: once per step, over the step's global batch
        if ema is not None:
            ema.update(model)

        for key, value in step_metrics.items():
            window.setdefault(key, []).append(value)
        window_items += cfg.batch_size * (cfg.seq_len if task.metric == "perplexity" else 1)
        done = step + 1
        if done % cfg.log_every == 0 or done == total:
            averaged = distributed.mean_across({k: sum(v) / len(v) for k, v in window.items()}, context)
            elapsed = time.perf_counter() - window_start
            averaged.update(lr=scheduler.get_last_lr()[0], items_per_s=window_items / max(elapsed, 1e-9))
            log.log(done, "train", averaged)
            bar.set_postfix({k: f"{averaged[k]:.4g}" for k in ("loss", task.metric, "items_per_s") if k in averaged})
            window, window_start, window_items = {}, time.perf_counter(), 0
        if cfg.eval_every and done % cfg.eval_every == 0 and done != total:
            log.log(done, "val", _evaluate(model, task, val_set, cfg, context, autocast))
            if on_eval is not None:
                _measure(model, on_eval, done, autocast)
        if cfg.checkpoints and (done % cfg.checkpoint_every == 0 or done == total):
            check_weights(model, done, checkpoints)
            if context.is_main or sharding.is_sharded(model):  # gathering shards takes every process
                model_state = sharding.full_model_state(model)
                trainer = {"optimizer": sharding.full_optimizer_state(model, optimizer),
                           "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict()}  # fmt: skip
            if context.is_main:
                save_checkpoint(checkpoints, done, model_state, trainer, ema.state_dict() if ema else None,
                                cfg.keep_checkpoints)  # fmt: skip
            distributed.barrier(context)

    check_weights(model, total, checkpoints)  # also when checkpoints are off: the final model is saved below
    for hooks in (sparsity, router_fit):
        if hooks is not None:
            hooks.close()
    # the trained model leaves without gradients, and the optimizer state goes now rather than at the next garbage
    # collection (the scheduler holds it in a reference cycle): for an LM that is 3x the model's size
    optimizer.zero_grad(set_to_none=True)
    del optimizer, scheduler
    gc.collect()
    final = _evaluate(model, task, val_set, cfg, context, autocast)
    if on_eval is not None:
        _measure(model, on_eval, total, autocast)
    log.log(total, "val", final)
    log.close()
    summary = {"steps": total, "val": final, "out": str(out)}
    whole = sharding.gathered_model(model, context)  # under FSDP a rebuilt, unsharded copy on the main process
    if context.is_main:
        if ema is not None:
            whole.load_state_dict({**whole.state_dict(), **ema.state_dict()})
        from ..export import save

        save(whole.cpu(), out / "model", overwrite=True)
        summary["curves"] = str(log.plot(task.metric))
    return summary


def _aux_objective(model: nn.Module, cfg: TrainConfig, metrics: dict) -> torch.Tensor:
    aux = collect_aux_losses(model)
    total = torch.zeros(())
    coefficients = {"load_balancing": cfg.aux.load_balancing, "z_loss": cfg.aux.z_loss,
                    "sequence_balance": cfg.aux.sequence_balance}  # fmt: skip
    for name, coefficient in coefficients.items():
        if name in aux and coefficient:
            total = total + coefficient * aux[name].float()
            metrics[name] = float(aux[name].detach())
    metrics["aux"] = float(total.detach())
    return total


def _measure(model: nn.Module, on_eval: Callable[[nn.Module, int], None], step: int, autocast) -> None:
    """``on_eval(model, step)`` in eval mode under the run's autocast, without grad; every module's mode restored."""
    was_training = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), autocast:
            on_eval(model, step)
    finally:
        for module, mode in was_training:
            module.training = mode


def _evaluate(model, task, dataset, cfg: TrainConfig, context, autocast) -> dict:
    """Validation on the whole split (or ``eval_batches`` batches), each process a shard, averaged."""
    was_training = [(module, module.training) for module in model.modules()]
    model.eval()
    size = min(cfg.batch_size, 256)
    # Under FSDP every process must run the same forwards (each gathers shards from all), so each takes every batch.
    rank, world = (0, 1) if sharding.is_sharded(model) else (context.rank, context.world)
    batch_iter = held_out_batches(dataset, size, context.device, cfg.eval_batches, rank, world)
    with torch.no_grad(), autocast:
        result = task.evaluate(model, batch_iter)
    for module, mode in was_training:  # each module as it was: the router stage keeps its backbone in eval mode
        module.training = mode
    return distributed.mean_across(result, context)
