"""Language-model training through the shared loop: held-out perplexity falls; pre-trained checkpoints are cached."""

import pytest
import torch

import upcycle
from upcycle.eval.report import evaluate_model
from upcycle.layers import moe_layers
from upcycle.pretrain import build_dense, cached_pretrained
from upcycle.train import train

SMALL_LM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2}  # fmt: skip


@pytest.mark.parametrize("arch", ["lm_tiny", "lm_tiny_parallel"])
def test_held_out_perplexity_falls(arch, tmp_path):
    model = build_dense(arch, **SMALL_LM)
    before = evaluate_model(model, "shakespeare", "val", batch_size=16, max_batches=4, seq_len=64)["perplexity"]
    summary = train(model, {"data": "shakespeare", "steps": 60, "batch_size": 16, "seq_len": 64, "lr": 3e-3,
                            "eval_batches": 4, "checkpoint_every": 60}, tmp_path, progress=False)  # fmt: skip
    after = summary["val"]["perplexity"]
    assert before > 150  # an untrained byte model is close to uniform over 259 tokens
    assert after < before / 4, (before, after)
    reloaded = upcycle.load(tmp_path / "model")  # the final model reloads as itself
    again = evaluate_model(reloaded, "shakespeare", "val", batch_size=16, max_batches=4, seq_len=64)["perplexity"]
    assert again == pytest.approx(after, rel=1e-4)


def test_cached_pretrained_trains_once(tmp_path, monkeypatch):
    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path))
    recipe = {"data": "digits", "steps": 3, "batch_size": 16, "checkpoint_every": 3}
    sizes = {"img_size": 8, "patch_size": 2, "in_chans": 1, "embed_dim": 32, "depth": 1, "num_heads": 2}
    first = cached_pretrained("timm:vit_tiny_patch16_224", recipe, progress=False, model=sizes)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = cached_pretrained("timm:vit_tiny_patch16_224", recipe, progress=False, model=sizes)
    assert again == first and (again / "model.safetensors").stat().st_mtime_ns == stamp
    model = upcycle.load(first)
    assert model.num_classes == 10 and model.patch_embed.img_size == (8, 8)


def test_cached_pretrained_started_twice_at_once_trains_once(tmp_path, monkeypatch):
    """Two benchmarks that need the same model at the same time: one trains it, the other waits and reuses it."""
    import threading
    import time

    import upcycle.pretrain

    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path))
    runs, real_pretrain = [], upcycle.pretrain.pretrain

    def slow_pretrain(*args, **kwargs):
        runs.append(threading.get_ident())
        time.sleep(0.5)  # the second caller arrives while the first is training
        return real_pretrain(*args, **kwargs)

    monkeypatch.setattr(upcycle.pretrain, "pretrain", slow_pretrain)
    recipe = {"data": "digits", "steps": 2, "batch_size": 16, "checkpoint_every": 2}
    sizes = {"img_size": 8, "patch_size": 2, "in_chans": 1, "embed_dim": 32, "depth": 1, "num_heads": 2}
    folders = []
    callers = [threading.Thread(target=lambda: folders.append(cached_pretrained(
        "timm:vit_tiny_patch16_224", recipe, progress=False, model=sizes))) for _ in range(2)]  # fmt: skip
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert len(runs) == 1 and len(folders) == 2 and folders[0] == folders[1]


def test_on_eval_measures_at_step_zero_every_validation_point_and_the_end(tmp_path):
    """``train(on_eval=...)`` (a benchmark's per-domain curves): called before the first update and at every
    validation point, in eval mode without grad; the training modes come back and the trained weights are those of
    a run without it."""
    import torch

    calls = []

    def on_eval(model, step):
        calls.append((step, model.training, torch.is_grad_enabled(), model.lm_head.weight.detach().clone()))

    recipe = {"data": "shakespeare", "steps": 5, "batch_size": 4, "seq_len": 32, "eval_every": 2, "eval_batches": 1,
              "checkpoints": False}  # fmt: skip
    model = build_dense("lm_tiny", **SMALL_LM)
    start = model.lm_head.weight.detach().clone()
    train(model, recipe, tmp_path / "measured", progress=False, on_eval=on_eval)
    assert [step for step, *_ in calls] == [0, 2, 4, 5]
    assert not any(training or grad for _, training, grad, _ in calls)
    assert torch.equal(calls[0][3], start) and not torch.equal(calls[-1][3], start)  # step 0: before any update
    plain = build_dense("lm_tiny", **SMALL_LM)
    train(plain, recipe, tmp_path / "plain", progress=False)
    assert torch.equal(plain.lm_head.weight, model.lm_head.weight)  # measuring changed nothing in the run


def test_training_moves_the_balancing_bias_once_per_step(tmp_path):
    """Aux-loss-free balancing in the loop: the bias moves by at most γ per optimizer step, however many micro-batches
    the step accumulates (an update per forward would reach 2γ per step here), and it does move."""
    steps, rate = 3, 0.01
    router = {"type": "sigmoid", "options": {"bias_update_rate": rate}}
    model = upcycle.convert(build_dense("lm_tiny", **SMALL_LM), method="sparse_upcycling", num_experts=4, top_k=1,
                            layers="all", router=router)  # fmt: skip
    train(model, {"data": "shakespeare", "steps": steps, "batch_size": 8, "grad_accum": 2, "seq_len": 32,
                  "eval_batches": 1, "checkpoints": False}, tmp_path, progress=False)  # fmt: skip
    biases = torch.stack([layer.router.expert_bias for _, layer in moe_layers(model)])  # [layers, e]
    assert 0 < biases.abs().max() <= steps * rate + 1e-6
    assert all(float(layer.router.routed_load.sum()) == 0 for _, layer in moe_layers(model))  # nothing left uncounted
