"""``upcycle demo`` (``make demo``): what a conversion buys on real checkpoints, each result beside a dense control
trained with the same compute, in about ten minutes on 2 CPU cores.

1. **SmolLM2-135M** (real weights) -> sparse upcycling (arXiv 2212.05055) into 4 experts per layer, top-2,
   renormalised -> verified against the dense model -> fine-tuned briefly on Shakespeare -> exported as Mixtral ->
   reloaded with transformers -> a sample. Its **dense control** is SmolLM2 itself, fine-tuned on the same batches
   in the same order with the same learning rate, for as many steps as the MoE's training FLOPs buy (top-2 of 4
   copies runs two FFNs per token: ~1.6x the dense model's FLOPs). The LR is constant after a 2-step warm-up, so
   the control's point at the MoE's step count is exactly a run of that length: one control run gives both the
   equal-steps and the equal-FLOPs comparison. Held-out perplexity (val split: whole plays never trained on) of both
   from step 0. Sparse upcycling, not Jetpack-style recycling: copies with renormalised top-k reproduce the dense
   model exactly (so the check means something) and map one-to-one onto Mixtral.
2. **MiniLM-L6** (real weights, a 3-way text-domain classifier fine-tuned first) -> D2DMoE (arXiv 2310.04361):
   ReLU + activation sparsity, 16 experts by balanced k-means, routers that predict expert norms, then accuracy vs
   MACs over the threshold τ. Its dense control is the dense classifier trained further for the training FLOPs of
   D2DMoE's sparsity and router stages. τ is chosen on 1,000 val passages; test (1,000 passages) is measured once,
   for the chosen τ and the two dense models.
3. A summary in the terminal and ``report.md`` with the plots, in the output folder, saying where the MoE does not
   win.

Compute convention: training FLOPs = 3 × forward FLOPs (forward + backward) per trained example, forward FLOPs = 2 ×
the MACs :func:`upcycle.eval.count_macs` counts (MoE layers charged for the experts they ran, routers included).
D2DMoE's router stage trains the routers alone with everything else frozen, so its steps are charged 1 × forward.
"""

from __future__ import annotations

import csv
import gc
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_write_text
from .record import copy_model

PROMPT = "ROMEO:\n"
ROUTING_BATCHES = 4  # held-out batches of 2 sequences behind the expert-load heatmap


@dataclass(frozen=True)
class DemoScale:
    experts: int  # SmolLM2: experts per layer (every layer: Mixtral has no dense layers)
    top_k: int
    finetune: dict  # SmolLM2 fine-tuning on Shakespeare, the MoE's and (longer) the dense control's
    new_tokens: int  # length of the generated sample
    minilm_finetune: dict  # MiniLM + head, dense
    minilm_recipe: dict  # upcycle.methods.d2dmoe recipe; eval_examples: held-out passages per split
    mac_examples: int  # held-out passages whose MACs are averaged at each τ


TEXT = {"data": "text_mixture", "seq_len": 64, "batch_size": 32}
DEFAULT = DemoScale(
    experts=4,
    top_k=2,
    finetune={
        "data": "shakespeare",
        "steps": 16,
        "batch_size": 4,
        "seq_len": 128,
        "lr": 6e-5,
        "warmup": 2,  # steps, and a constant LR after them: a longer run passes through a shorter one's weights
        "schedule": "constant",
        "weight_decay": 0.0,
        "precision": "bf16",
        "eval_batches": 16,  # 16 × 4 sequences of 128 tokens of the val split at every held-out point
        "log_every": 2,
        "eval_every": 8,  # must divide steps: the dense control is read at the MoE's step count
        "checkpoints": False,  # weights + AdamW state would add ~3x the model's 1.5 GB; the final model is saved
    },
    new_tokens=48,
    minilm_finetune={**TEXT, "steps": 30, "lr": 6e-5, "warmup": 0.1, "weight_decay": 0.01, "eval_batches": 4},
    minilm_recipe={
        "data": "text_mixture",
        "num_experts": 16,
        "router_hidden": 64,
        "eval_examples": 1000,
        "taus": [0.0, 0.2, 0.35, 0.5, 0.7],
        "methods": ["d2dmoe"],
        "sparsify": {**TEXT, "steps": 30, "lr": 5e-5, "eval_batches": 4, "aux": {"sparsity": 0.003}},
        "routers": {**TEXT, "steps": 20, "lr": 1e-3, "eval_batches": 4},
    },
    mac_examples=256,
)
QUICK = DemoScale(  # a smoke run of every step (tests)
    experts=4,
    top_k=2,
    finetune={
        **DEFAULT.finetune,
        **{"steps": 2, "batch_size": 2, "seq_len": 32, "eval_batches": 1, "log_every": 1, "eval_every": 2, "warmup": 1},
    },
    new_tokens=8,
    minilm_finetune={**TEXT, "batch_size": 8, "steps": 2, "eval_batches": 1},
    minilm_recipe={
        "data": "text_mixture",
        "num_experts": 4,
        "eval_examples": 32,
        "taus": [0.0, 0.5, 1.0],
        "methods": ["d2dmoe"],
        "sparsify": {**TEXT, "batch_size": 8, "steps": 2, "eval_batches": 1},
        "routers": {**TEXT, "batch_size": 8, "steps": 2, "eval_batches": 1},
    },
    mac_examples=16,
)


class Steps:
    """Numbered progress lines (``[3/9] fine-tune on Shakespeare``) with the time each step took."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self.began = time.perf_counter()

    def __call__(self, what: str) -> None:
        self.done += 1
        if self.enabled:
            print(f"[{self.done}/{self.total}] {what}  (+{time.perf_counter() - self.began:.0f} s)", flush=True)


# ---- SmolLM2: sparse upcycling against its dense control ---------------------------------------------------------
def held_out_point(model: nn.Module, config: dict) -> dict:
    """The held-out point the training loop logs every ``eval_every`` steps (same split, batches and precision), for
    a model before its first step: ``{"loss", "perplexity"}``."""
    from .adapters import adapter_of
    from .config import load_train_config
    from .data.batches import held_out_batches
    from .eval.tasks import make_task

    cfg = load_train_config(config)
    task = make_task(model, adapter_of(model), cfg)
    batches = held_out_batches(task.dataset("val"), min(cfg.batch_size, 256), "cpu", cfg.eval_batches)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            return task.evaluate(model, batches)
    finally:
        model.train(was_training)


def lm_curve(run: Path, step0: dict, flops_per_step: float) -> list[dict]:
    """Held-out points of a training run (``metrics.csv``) after its step-0 point, with the training FLOPs spent."""
    with open(run / "metrics.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["split"] == "val"]
    points = [(0, step0["perplexity"])] + [(int(row["step"]), float(row["perplexity"])) for row in rows]
    return [{"step": s, "perplexity": p, "train_flops": s * flops_per_step} for s, p in points]


def at_step(curve: list[dict], step: int) -> float:
    return next(point["perplexity"] for point in curve if point["step"] == step)


def expert_spread(model: nn.Module) -> float:
    """How far the copies have grown apart: per MoE layer, the mean distance of each expert's weights from the
    experts' mean, relative to the mean's norm, averaged over layers (0 for exact copies)."""
    from .layers.moe import moe_layers

    spreads = []
    for _, layer in moe_layers(model):
        experts = layer.experts
        weights = [w for w in (experts.w_up, experts.w_gate, experts.w_down) if w is not None]
        flat = torch.cat([w.detach().float().flatten(1) for w in weights], dim=1)  # [e, all of one expert's weights]
        mean = flat.mean(0)
        spreads.append(float((flat - mean).norm(dim=1).mean() / mean.norm()))
    return sum(spreads) / len(spreads)


def smollm2_job(out: Path, scale: DemoScale, step: Steps, progress: bool) -> dict:
    """Upcycle SmolLM2, check it, fine-tune it, measure it, export it, reload it, sample from it."""
    import transformers

    from .assets import smollm2_dir
    from .convert import convert
    from .eval import collect_routing_stats, count_macs, plot_expert_load
    from .eval.held_out import HeldOut
    from .export import export
    from .sources import load_source
    from .train import train
    from .verify import verify

    config = scale.finetune
    step("SmolLM2-135M: load the real checkpoint (dequantised from its GGUF once, then cached)")
    path = smollm2_dir()
    dense = load_source(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    step(f"sparse upcycling: every FFN -> {scale.experts} experts, top-{scale.top_k}, renormalised; step-0 points")
    moe = convert(dense, "sparse_upcycling", num_experts=scale.experts, top_k=scale.top_k, progress=progress)
    held_out = HeldOut(moe, "shakespeare", "val", 4, config["seq_len"])
    sample_batch = next(iter(held_out.batches(1)))
    check = verify(moe, dense, {"input_ids": sample_batch["input_ids"][:4]})
    max_abs_diff = check.end_to_end
    print(f"      max |moe - dense| on held-out text: {max_abs_diff:.2e} (worst layer {check.worst_layer}: "
          f"{check.worst_relative:.1e} of its output)")  # fmt: skip
    one = {"input_ids": sample_batch["input_ids"][:1]}
    macs = {"dense": count_macs(dense, one).total, "moe": count_macs(moe, one).total}  # per sequence
    params = {"dense": sum(p.numel() for p in dense.parameters()), "moe": sum(p.numel() for p in moe.parameters())}
    began = time.perf_counter()
    step0 = {"moe": held_out_point(moe, config)}
    moe_eval_seconds = time.perf_counter() - began
    step0["dense"] = held_out_point(dense, config)
    print(f"      step 0 held-out perplexity: MoE {step0['moe']['perplexity']:.2f}, dense "
          f"{step0['dense']['perplexity']:.2f}; MoE forward {macs['moe'] / macs['dense']:.2f}x dense")  # fmt: skip
    del dense
    step(f"fine-tune the MoE on Shakespeare ({config['steps']} steps)")
    finetune = train(moe, config, out / "finetune", progress=progress)
    moe.eval()
    curve = lm_curve(out / "finetune", step0["moe"], 6 * macs["moe"] * config["batch_size"])
    print(f"      perplexity {curve[0]['perplexity']:.2f} -> {curve[-1]['perplexity']:.2f}")
    spread = expert_spread(moe)
    stats = collect_routing_stats(moe, held_out.batches(2), max_batches=ROUTING_BATCHES)
    load_png = plot_expert_load(stats, out / "expert_load.png", "SmolLM2 MoE after fine-tuning, held-out Shakespeare")
    step("export as Mixtral and reload it with transformers")
    mixtral_dir = export(moe, out / "mixtral", format="mixtral", overwrite=True)
    mixtral = transformers.AutoModelForCausalLM.from_pretrained(mixtral_dir).eval()
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        export_diff = float((mixtral(prompt).logits - moe(prompt).logits).abs().max())
        torch.manual_seed(0)
        generated = mixtral.generate(prompt, max_new_tokens=scale.new_tokens, do_sample=True, top_p=0.9,
                                     temperature=0.8, pad_token_id=tokenizer.eos_token_id)  # fmt: skip
    sample = tokenizer.decode(generated[0], skip_special_tokens=True)
    print(f"      {type(mixtral).__name__} from {mixtral_dir}: max |logit difference| {export_diff:.1e}; sample:")
    print("      " + sample.replace("\n", "\n      "))
    mixtral_class = type(mixtral).__name__
    del moe, mixtral
    gc.collect()  # the MoE and its Mixtral twin (3 GB) go before the dense control trains

    dense_steps = max(config["steps"] + 1, round(config["steps"] * macs["moe"] / macs["dense"]))
    step(f"dense control: the same fine-tune of dense SmolLM2 for {dense_steps} steps (the MoE's training FLOPs)")
    dense = load_source(path)
    train(dense, {**config, "steps": dense_steps}, out / "dense_control", progress=progress)
    control = lm_curve(out / "dense_control", step0["dense"], 6 * macs["dense"] * config["batch_size"])
    del dense
    gc.collect()
    steps = finetune["steps"]
    return {
        "experts": scale.experts, "top_k": scale.top_k, "max_abs_diff": max_abs_diff,
        "eval_sequences": config["eval_batches"] * config["batch_size"], "seq_len": config["seq_len"],
        "macs_per_token": {k: v / config["seq_len"] for k, v in macs.items()}, "params": params,
        "finetune_steps": steps, "dense_steps": dense_steps, "moe_curve": curve, "dense_curve": control,
        "perplexity_step0": {k: v["perplexity"] for k, v in step0.items()},
        "perplexity_moe": curve[-1]["perplexity"], "perplexity_dense_equal_steps": at_step(control, steps),
        "perplexity_dense_equal_flops": control[-1]["perplexity"], "expert_spread": spread,
        "moe_eval_seconds": moe_eval_seconds,
        "finetune_curves": finetune.get("curves"), "expert_load_png": str(load_png), "mixtral_dir": str(mixtral_dir),
        "mixtral_class": mixtral_class,
        "export_logit_diff": export_diff, "sample": sample,
    }  # fmt: skip


def plot_lm(lm: dict, path: Path) -> Path:
    """Held-out perplexity of the MoE and its dense control from step 0, against steps and against training FLOPs."""
    from .plotting import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    runs = ((f"MoE ({lm['experts']} copies, top-{lm['top_k']})", lm["moe_curve"], "o-"),
            ("dense control", lm["dense_curve"], "s--"))  # fmt: skip
    for ax, x, label in zip(axes, ("step", "train_flops"), ("optimizer steps", "training TFLOPs"), strict=True):
        scale = 1e-12 if x == "train_flops" else 1
        for name, curve, style in runs:
            ax.plot([p[x] * scale for p in curve], [p["perplexity"] for p in curve], style, label=name, ms=5)
        marker = lm["moe_curve"][-1][x] * scale
        ax.axvline(marker, color="grey", lw=0.8, ls=":", label=f"the MoE's {'steps' if x == 'step' else 'compute'}")
        ax.set(xlabel=label, ylabel="held-out perplexity (val plays)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("equal steps")
    axes[1].set_title("equal training FLOPs")
    fig.suptitle("SmolLM2-135M fine-tuned on Shakespeare: sparse-upcycled MoE vs dense, from step 0", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    return path


# ---- MiniLM: D2DMoE against its dense control --------------------------------------------------------------------
def control_steps(recipe) -> int:
    """Extra dense steps costing D2DMoE's sparsity stage (full steps) and router stage (forward only) in FLOPs."""
    sparsify, routers = recipe.sparsify_config(), recipe.router_config()
    spent = 3 * sparsify.steps * sparsify.batch_size + routers.steps * routers.batch_size  # in forward passes
    return max(1, round(spent / (3 * sparsify.batch_size)))


def plot_minilm(d2d: dict, path: Path) -> Path:
    """Val accuracy vs MACs: the τ sweep, the dense model it came from and the equal-compute dense control."""
    from .plotting import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    rows = sorted(d2d["d2dmoe"], key=lambda row: row["flops_fraction"])
    ax.plot([r["flops_fraction"] for r in rows], [r["val"] for r in rows], "o-", label="D2DMoE (τ sweep)", ms=5)
    for row, tau in zip(rows, [r["point"] for r in rows], strict=True):
        ax.annotate(f"τ={tau}", (row["flops_fraction"], row["val"]), fontsize=7, xytext=(3, -10),
                    textcoords="offset points")  # fmt: skip
    ax.plot([1.0], [d2d["dense"]["val"]], "k*", ms=12, label=f"dense it came from ({d2d['dense_steps']} steps)")
    ax.plot([1.0], [d2d["control"]["val"]], "rD", ms=7,
            label=f"dense control (+{d2d['control_steps']} steps: equal training FLOPs)")  # fmt: skip
    ax.axhline(d2d["dense"]["val"] - 0.01, color="grey", lw=0.8, ls=":", label="dense − 1 point")
    ax.set(xlabel="MACs per passage / dense model's", ylabel=f"val accuracy ({d2d['eval_examples']} passages)",
           title="MiniLM-L6 → D2DMoE, 3-way text-domain classification")  # fmt: skip
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)
    return path


def minilm_job(out: Path, scale: DemoScale, step: Steps, progress: bool) -> dict:
    """MiniLM as a domain classifier, then D2DMoE swept over τ, beside the dense classifier trained as long."""
    from .eval.held_out import HeldOut
    from .layers.moe import set_tau
    from .methods.d2dmoe import load_recipe, run_stages
    from .methods.d2dmoe.sweep import lowest_fraction_within, macs_per_example, sweep
    from .pretrain import finetuned_minilm
    from .train import train

    step("MiniLM-L6: fine-tune a 3-way text-domain classifier (Shakespeare / Python code / Python docs)")
    dense = finetuned_minilm(scale.minilm_finetune, out / "dense", progress=progress)
    recipe = load_recipe(scale.minilm_recipe)
    step(f"D2DMoE: ReLU + sparsity, {recipe.num_experts} experts per FFN, routers that predict expert norms")
    model = run_stages(dense, recipe, out, progress=progress)["d2dmoe"]
    extra = control_steps(recipe)
    step(f"dense control: the dense classifier trained {extra} steps more (D2DMoE's sparsity + router stages' FLOPs)")
    control = copy_model(dense)
    sparsify = recipe.sparsify_config().model_dump(mode="json")
    control_config = {**sparsify, "steps": extra, "epochs": None, "aux": {}, "checkpoints": False}
    train(control, control_config, out / "dense_control", progress=progress)
    control.eval()
    examples = recipe.eval_examples
    step(f"sweep τ on {examples} held-out val passages; test ({examples}) once for the chosen τ and the dense models")
    seq_len = recipe.sparsify_config().seq_len
    val, test = (HeldOut(dense, recipe.data, split, examples, seq_len) for split in ("val", "test"))
    dense_macs = macs_per_example(dense, val, 64)  # no routing: every passage costs the same
    reference = {"val": val.metric(dense), "test": test.metric(dense), "flops_fraction": 1.0}
    controlled = {"val": val.metric(control), "test": test.metric(control), "flops_fraction": 1.0}
    rows = sweep(model, dense_macs, recipe.taus, set_tau, {"val": val}, scale.mac_examples, desc="τ sweep")
    point = lowest_fraction_within(rows, reference["val"], "val")  # chosen on val; test is read once, below
    if point is not None:
        set_tau(model, point["point"])
        point["test"] = test.metric(model)
    curves_png = plot_minilm(
        {"d2dmoe": rows, "dense": reference, "control": controlled, "eval_examples": len(val.dataset),
         "dense_steps": scale.minilm_finetune["steps"], "control_steps": extra}, out / "curves.png"
    )  # fmt: skip
    return {"dense": reference, "control": controlled, "d2dmoe": rows, "operating_point": point,
            "dense_steps": scale.minilm_finetune["steps"], "control_steps": extra,
            "val_examples": len(val.dataset), "test_examples": len(test.dataset), "mac_examples": scale.mac_examples,
            "curves_png": str(curves_png)}  # fmt: skip


# ---- summary and report ------------------------------------------------------------------------------------------
def verdicts(lm: dict, d2d: dict) -> list[str]:
    """Plain sentences on where the MoE does not win (and where it does), from the measured numbers."""
    moe, steps, flops = lm["perplexity_moe"], lm["perplexity_dense_equal_steps"], lm["perplexity_dense_equal_flops"]
    cost = lm["macs_per_token"]["moe"] / lm["macs_per_token"]["dense"]
    said = []
    if moe >= flops:
        said.append(f"SmolLM2: at equal training FLOPs the dense control wins (perplexity {flops:.2f} vs the MoE's "
                    f"{moe:.2f}): upcycling bought nothing here.")  # fmt: skip
    else:
        said.append(f"SmolLM2: at equal training FLOPs the MoE leads by {flops - moe:.2f} perplexity ({moe:.2f} vs "
                    f"{flops:.2f}) after {lm['finetune_steps']} steps: a short run, one held-out sample.")  # fmt: skip
    said.append(
        f"SmolLM2: at equal steps the MoE is {'ahead' if moe < steps else 'not ahead'} ({moe:.2f} vs {steps:.2f}), "
        f"but every MoE token costs {cost:.2f}x the dense FLOPs and the model holds "
        f"{lm['params']['moe'] / lm['params']['dense']:.2f}x the parameters, for inference as well as training."
    )
    point, dense, control = d2d["operating_point"], d2d["dense"], d2d["control"]
    if point is None:
        said.append("MiniLM: no τ keeps D2DMoE within 1 point of the dense model on val: no saving here.")
    else:
        said.append(
            f"MiniLM: D2DMoE at τ={point['point']} saves {1 - point['flops_fraction']:.0%} of the MACs within 1 point "
            f"on val; on test it scores {point['test']:.3f} against the dense model's {dense['test']:.3f} and the "
            f"equal-compute dense control's {control['test']:.3f}"
            + (" (below both)." if point["test"] < min(dense["test"], control["test"]) else ".")
        )
    costly = [row["point"] for row in d2d["d2dmoe"] if row["flops_fraction"] >= 1.0]
    if costly:
        said.append(f"MiniLM: at τ={', '.join(map(str, costly))} D2DMoE costs more than the dense model (its routers).")
    return said


def summary_rows(lm: dict, d2d: dict) -> list[tuple[str, str]]:
    p0, point = lm["perplexity_step0"], d2d["operating_point"]
    at_point = "no τ within 1 point" if point is None else (
        f"τ={point['point']}: {point['flops_fraction']:.2f} of dense MACs, val {point['val']:.3f}, "
        f"test {point['test']:.3f}"
    )  # fmt: skip
    return [
        ("SmolLM2 MoE", f"{lm['experts']} experts × 30 layers, top-{lm['top_k']}, sparse upcycling"),
        ("max |MoE − dense| after conversion", f"{lm['max_abs_diff']:.2e}"),
        ("held-out perplexity, step 0", f"MoE {p0['moe']:.2f} / dense {p0['dense']:.2f}"),
        (
            f"… after {lm['finetune_steps']} steps (equal steps)",
            f"MoE {lm['perplexity_moe']:.2f} / dense control {lm['perplexity_dense_equal_steps']:.2f}",
        ),
        (
            "… at equal training FLOPs",
            f"MoE {lm['perplexity_moe']:.2f} ({lm['finetune_steps']} steps) / dense control "
            f"{lm['perplexity_dense_equal_flops']:.2f} ({lm['dense_steps']} steps)",
        ),
        ("exported", f"{lm['mixtral_class']} in {lm['mixtral_dir']}, logits within {lm['export_logit_diff']:.1e}"),
        (
            "MiniLM accuracy val / test",
            f"dense {d2d['dense']['val']:.3f} / {d2d['dense']['test']:.3f}; dense control (equal FLOPs) "
            f"{d2d['control']['val']:.3f} / {d2d['control']['test']:.3f}",
        ),
        ("D2DMoE, cheapest τ within 1 point (val)", at_point),
    ]


def write_report(out: Path, lm: dict, d2d: dict, seconds: float) -> Path:
    """``report.md`` next to the plots it shows (paths relative to the report)."""

    def cell(text: str) -> str:  # "max |MoE − dense|" inside a Markdown table
        return text.replace("|", "\\|")

    def relative(path: str | None) -> str:
        return str(Path(path).resolve().relative_to(out.resolve())) if path else ""

    from .provenance import provenance

    record = {"smollm2": lm, "minilm": d2d, "seconds": seconds, **provenance()}
    machine = record["machine"]
    table = "\n".join(f"| {cell(name)} | {cell(value)} |" for name, value in summary_rows(lm, d2d))
    moe_curve, dense_curve = lm["moe_curve"], lm["dense_curve"]
    lm_rows = "\n".join(
        f"| {p['step']} | {p['train_flops'] / 1e12:.1f} | {model} | {p['perplexity']:.2f} |"
        for model, curve in (("MoE", moe_curve), ("dense control", dense_curve))
        for p in curve
    )
    cost = lm["macs_per_token"]["moe"] / lm["macs_per_token"]["dense"]
    tokens = lm["eval_sequences"] * lm["seq_len"]
    point = d2d["operating_point"]
    sweep = "\n".join(
        f"| D2DMoE τ={r['point']} | {r['flops_fraction']:.3f} | {r['val']:.3f} | "
        f"{r['test']:.3f} |" if "test" in r else
        f"| D2DMoE τ={r['point']} | {r['flops_fraction']:.3f} | {r['val']:.3f} | not measured (τ not chosen) |"
        for r in d2d["d2dmoe"]
    )  # fmt: skip
    said = "\n".join(f"- {line}" for line in verdicts(lm, d2d))
    load_note = (
        "So the pattern shows how evenly the router spreads tokens (the load-balancing loss at work), not experts "
        "that specialised: that takes far longer training than a demo's."
        if lm["expert_spread"] < 0.05
        else "The copies have moved apart, so part of the pattern may be specialisation."
    )
    text = f"""# upcycle demo report

Everything below ran in {seconds / 60:.1f} minutes on {machine["cpu_count"]} CPU cores (torch {machine["torch"]}), from
real checkpoints, offline. Reproduce with `make demo` (or `upcycle demo --out DIR`); the numbers are in `demo.json`.
Each result stands beside a **dense control trained with the same compute**: training FLOPs = 3 × forward FLOPs per
trained example (forward + backward), forward FLOPs = 2 × the MACs `upcycle.eval.count_macs` counts (MoE layers
charged for the experts they ran, routers included).

| | |
|---|---|
{table}

**Where the MoE does not win**

{said}

## SmolLM2-135M → MoE → fine-tuned → Mixtral, beside dense SmolLM2

Every FFN of SmolLM2 became {lm["experts"]} copies behind a router (top-{lm["top_k"]}, renormalised), so the MoE
starts as exactly the dense model (max difference {lm["max_abs_diff"]:.1e}; step 0 below). Each MoE token runs
{lm["top_k"]} FFNs: its forward costs {cost:.2f}× the dense model's FLOPs and it holds
{lm["params"]["moe"] / 1e6:.0f} M parameters against {lm["params"]["dense"] / 1e6:.0f} M. Both were fine-tuned on
Shakespeare with the same batches in the same order and the same learning rate (constant after a 2-step warm-up, so
the dense run's point at step {lm["finetune_steps"]} is exactly a {lm["finetune_steps"]}-step run): the MoE for
{lm["finetune_steps"]} steps, the dense control for {lm["dense_steps"]}, the steps the MoE's training FLOPs buy.

Held-out perplexity is measured on the first {lm["eval_sequences"]} sequences of {lm["seq_len"]} tokens
({tokens:,} tokens) of the val split, whole plays never trained on, the same sequences at every point. Not 1,000
sequences: the MoE's step-0 evaluation took {lm["moe_eval_seconds"]:.0f} s here, so one on 1,000 sequences would take
about {lm["moe_eval_seconds"] * 1000 / lm["eval_sequences"] / 60:.0f} minutes, and the curves need several. The test
split is not used.

| step | training TFLOPs | model | held-out perplexity |
|---|---|---|---|
{lm_rows}

![MoE vs dense control from step 0]({relative(lm["compare_png"])})

The expert load below is measured after fine-tuning. The copies started identical, so which copy a token goes to
was decided by the randomly initialised router, not by what the copies know; after {lm["finetune_steps"]} steps they
differ by {lm["expert_spread"]:.2%} of their weights' norm (mean distance from the experts' mean).
{load_note}

![expert load]({relative(lm["expert_load_png"])})

The Mixtral export reloads with `transformers.AutoModelForCausalLM.from_pretrained("{lm["mixtral_dir"]}")`.
Sample from the reloaded model (prompt `{PROMPT.strip()}`, top-p 0.9, temperature 0.8):

```
{lm["sample"]}
```

## MiniLM-L6 → D2DMoE: compute vs quality, beside the dense classifier

A dense MiniLM classifier (which domain a 64-token passage comes from, {d2d["dense_steps"]} fine-tuning steps) made
sparse, split into experts, and given routers. D2DMoE runs a per-token number of experts (those predicted to
contribute at least τ of the largest). MACs are a fraction of the dense model's, routers included, averaged over
{d2d["mac_examples"]} passages per τ. Its dense control is the same classifier trained {d2d["control_steps"]} steps
more, the training FLOPs of D2DMoE's sparsity stage (full steps) and router stage (routers alone, charged one forward
per example). τ is chosen on {d2d["val_examples"]:,} val passages; the test split ({d2d["test_examples"]:,} passages)
is read once, for the chosen τ{"" if point else " (none qualified)"} and the two dense models. `upcycle bench d2dmoe`
sets MoEfication's fixed top-k next to it, with longer training.

![accuracy vs MACs]({relative(d2d["curves_png"])})

| model | MACs / dense | val accuracy | test accuracy |
|---|---|---|---|
| dense it came from ({d2d["dense_steps"]} steps) | 1.000 | {d2d["dense"]["val"]:.3f} | {d2d["dense"]["test"]:.3f} |
| dense control (+{d2d["control_steps"]} steps, equal training FLOPs) | 1.000 | {d2d["control"]["val"]:.3f} | {d2d["control"]["test"]:.3f} |
{sweep}
"""  # noqa: E501
    path = out / "report.md"
    atomic_write_text(path, text)
    atomic_write_text(out / "demo.json", json.dumps(record, indent=2, default=float) + "\n")
    return path


def run_demo(out: str | Path = "out/demo", quick: bool = False, progress: bool = True) -> dict:
    """Both jobs, the terminal summary and the report; returns ``{"smollm2", "minilm", "report", "seconds"}``."""
    scale = QUICK if quick else DEFAULT
    out = Path(out)
    for job in ("smollm2", "minilm"):  # a demo shows every step: nothing from an earlier run is reused
        shutil.rmtree(out / job, ignore_errors=True)
    began = time.perf_counter()
    step = Steps(total=10, enabled=progress)
    lm = smollm2_job(out / "smollm2", scale, step, progress)
    lm["compare_png"] = str(plot_lm(lm, out / "smollm2" / "curves.png"))
    d2d = minilm_job(out / "minilm", scale, step, progress)
    seconds = time.perf_counter() - began
    step("report")
    report = write_report(out, lm, d2d, seconds)
    width = max(len(name) for name, _ in summary_rows(lm, d2d))
    print("\n" + "\n".join(f"  {name:<{width}}  {value}" for name, value in summary_rows(lm, d2d)))
    print("\n  where the MoE does not win:\n" + "\n".join(f"  - {line}" for line in verdicts(lm, d2d)))
    print(f"\nreport: {report.resolve()}  ({seconds / 60:.1f} min)")
    return {"smollm2": lm, "minilm": d2d, "report": str(report), "seconds": seconds}
