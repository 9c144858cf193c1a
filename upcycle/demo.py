"""``upcycle demo`` (``make demo``): upcycle's main job on real checkpoints, in about ten minutes on 2 CPU cores.

1. **SmolLM2-135M** (real weights) -> sparse upcycling (arXiv 2212.05055) into 4 experts per layer, top-2,
   renormalised -> verified against the dense model -> fine-tuned briefly on Shakespeare -> held-out perplexity
   before and after (whole plays never trained on) -> exported as Mixtral -> reloaded with transformers -> a sample.
   Sparse upcycling, not Jetpack-style recycling: copies with renormalised top-k reproduce the dense model exactly
   (so the check means something) and map one-to-one onto Mixtral; Jetpack samples experts by activation
   importance measured on images and feeds a slot router that no LM format can express.
2. **MiniLM-L6** (real weights, a 3-way text-domain classifier fine-tuned first) -> D2DMoE (arXiv 2310.04361):
   ReLU + activation sparsity, 16 experts by balanced k-means, routers that predict expert norms, then accuracy vs
   MACs over the threshold τ. (MoEfication's fixed top-k next to it is `upcycle bench d2dmoe`'s; it would add
   about a minute and a half here.)
3. A summary table in the terminal and ``report.md`` with the plots, in the output folder.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import atomic_write_text

PROMPT = "ROMEO:\n"
ROUTING_BATCHES = 4  # held-out batches of 2 sequences behind the expert-load heatmap


@dataclass(frozen=True)
class DemoScale:
    experts: int  # SmolLM2: experts per layer (every layer: Mixtral has no dense layers)
    top_k: int
    finetune: dict  # SmolLM2 MoE fine-tuning on Shakespeare
    eval_sequences: int  # held-out Shakespeare sequences for the perplexities
    new_tokens: int  # length of the generated sample
    minilm_finetune: dict  # MiniLM + head, dense
    minilm_recipe: dict  # upcycle.d2dmoe recipe
    mac_examples: int


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
        "warmup": 0.1,
        "weight_decay": 0.0,
        "precision": "bf16",
        "eval_batches": 4,
        "log_every": 2,
        "eval_every": 4,  # held-out points on the curves, not only the last
        "checkpoints": False,  # weights + AdamW state would add ~3x the model's 1.5 GB; the final model is saved
    },
    eval_sequences=32,
    new_tokens=48,
    minilm_finetune={**TEXT, "steps": 30, "lr": 6e-5, "warmup": 0.1, "weight_decay": 0.01, "eval_batches": 4},
    minilm_recipe={
        "data": "text_mixture",
        "num_experts": 16,
        "router_hidden": 64,
        "eval_examples": 192,
        "taus": [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0],
        "methods": ["d2dmoe"],
        "sparsify": {**TEXT, "steps": 30, "lr": 5e-5, "eval_batches": 4, "aux": {"sparsity": 0.003}},
        "routers": {**TEXT, "steps": 20, "lr": 1e-3, "eval_batches": 4},
    },
    mac_examples=64,
)
QUICK = DemoScale(  # a smoke run of every step (tests)
    experts=4,
    top_k=2,
    finetune={**DEFAULT.finetune, "steps": 2, "batch_size": 2, "seq_len": 32, "eval_batches": 1, "log_every": 1},
    eval_sequences=4,
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


def smollm2_job(out: Path, scale: DemoScale, step: Steps, progress: bool) -> dict:
    """Upcycle SmolLM2, check it, fine-tune it, measure it, export it, reload it, sample from it."""
    import transformers

    import upcycle

    from .assets import smollm2_dir
    from .eval import collect_routing_stats, plot_expert_load
    from .eval.held_out import HeldOut
    from .sources import load_source
    from .train import train

    step("SmolLM2-135M: load the real checkpoint (dequantised from its GGUF once, then cached)")
    path = smollm2_dir()
    dense = load_source(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    step(f"sparse upcycling: every FFN -> {scale.experts} experts, top-{scale.top_k}, renormalised")
    moe = upcycle.convert(dense, "sparse_upcycling", num_experts=scale.experts, top_k=scale.top_k, progress=progress)
    held_out = HeldOut(moe, "shakespeare", "test", scale.eval_sequences, scale.finetune["seq_len"])
    sample_batch = next(iter(held_out.batches(1)))
    check = upcycle.verify(moe, dense, {"input_ids": sample_batch["input_ids"][:4]})
    max_abs_diff = check.end_to_end
    print(f"      max |moe - dense| on held-out text: {max_abs_diff:.2e} (worst layer {check.worst_layer}: "
          f"{check.worst_relative:.1e} of its output)")  # fmt: skip
    del dense
    step(f"held-out perplexity before fine-tuning ({scale.eval_sequences} sequences of unseen plays)")
    before = held_out.metric(moe)
    print(f"      perplexity {before:.2f}")
    step(f"fine-tune the MoE on Shakespeare ({scale.finetune['steps']} steps)")
    finetune = train(moe, scale.finetune, out / "finetune", progress=progress)
    moe.eval()
    after = held_out.metric(moe)
    print(f"      perplexity {before:.2f} -> {after:.2f}")
    stats = collect_routing_stats(moe, held_out.batches(2), max_batches=ROUTING_BATCHES)
    load_png = plot_expert_load(stats, out / "expert_load.png", "SmolLM2 MoE on held-out Shakespeare")
    step("export as Mixtral and reload it with transformers")
    mixtral_dir = upcycle.export(moe, out / "mixtral", format="mixtral", overwrite=True)
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
    return {
        "experts": scale.experts, "top_k": scale.top_k, "max_abs_diff": max_abs_diff,
        "perplexity_before": before, "perplexity_after": after, "finetune_steps": finetune["steps"],
        "finetune_curves": finetune.get("curves"), "expert_load_png": str(load_png), "mixtral_dir": str(mixtral_dir),
        "mixtral_class": type(mixtral).__name__, "export_logit_diff": export_diff, "sample": sample,
    }  # fmt: skip


def minilm_job(out: Path, scale: DemoScale, step: Steps, progress: bool) -> dict:
    """MiniLM as a domain classifier, then D2DMoE, swept over τ."""
    from .bench.d2dmoe import minilm_dense
    from .d2dmoe import load_recipe, run_stages, sweep_methods
    from .d2dmoe.plots import plot_curves
    from .d2dmoe.sweep import lowest_fraction_within

    step("MiniLM-L6: fine-tune a 3-way text-domain classifier (Shakespeare / Python code / Python docs)")
    dense = minilm_dense(scale.minilm_finetune, out / "dense", progress)
    recipe = load_recipe(scale.minilm_recipe)
    step(f"D2DMoE: ReLU + sparsity, {recipe.num_experts} experts per FFN, routers that predict expert norms")
    models = run_stages(dense, recipe, out, progress=progress)
    step("sweep τ: accuracy vs MACs on held-out passages")
    results = sweep_methods(models, dense, recipe, out, mac_examples=scale.mac_examples)
    panel = {"dense": results["dense"], "variants": {m: results[m] for m in recipe.methods}}
    curves_png = plot_curves({"MiniLM-L6, text-domain classification": panel}, out / "curves.png", split="val")
    point = lowest_fraction_within(results["d2dmoe"], results["dense"]["val"], "val")
    return {"dense": results["dense"], "d2dmoe": results["d2dmoe"], "operating_point": point,
            "curves_png": str(curves_png)}  # fmt: skip


def summary_rows(lm: dict, d2d: dict) -> list[tuple[str, str]]:
    point = d2d["operating_point"]
    at_point = "no τ within 1 point" if point is None else (
        f"{point['flops_fraction']:.2f} of dense MACs at τ={point['point']} "
        f"(val {point['val']:.3f}, test {point['test']:.3f})"
    )  # fmt: skip
    return [
        ("SmolLM2 MoE", f"{lm['experts']} experts × 30 layers, top-{lm['top_k']}, sparse upcycling"),
        ("max |MoE − dense| after conversion", f"{lm['max_abs_diff']:.2e}"),
        (
            "held-out Shakespeare perplexity",
            f"{lm['perplexity_before']:.2f} → {lm['perplexity_after']:.2f} "
            f"after {lm['finetune_steps']} fine-tuning steps",
        ),
        ("exported", f"{lm['mixtral_class']} in {lm['mixtral_dir']}, logits within {lm['export_logit_diff']:.1e}"),
        ("MiniLM dense accuracy (val / test)", f"{d2d['dense']['val']:.3f} / {d2d['dense']['test']:.3f}"),
        ("D2DMoE within 1 point of dense (val)", at_point),
    ]


def write_report(out: Path, lm: dict, d2d: dict, seconds: float) -> Path:
    """``report.md`` next to the plots it shows (paths relative to the report)."""

    def cell(text: str) -> str:  # "max |MoE − dense|" inside a Markdown table
        return text.replace("|", "\\|")

    def relative(path: str | None) -> str:
        return str(Path(path).resolve().relative_to(out.resolve())) if path else ""

    from .bench.common import provenance

    record = {"smollm2": lm, "minilm": d2d, "seconds": seconds, **provenance()}
    machine = record["machine"]
    table = "\n".join(f"| {cell(name)} | {cell(value)} |" for name, value in summary_rows(lm, d2d))
    rows = [("dense", {"flops_fraction": 1.0, **d2d["dense"]})]
    rows += [(f"D2DMoE τ={r['point']}", r) for r in d2d["d2dmoe"]]
    sweep = "\n".join(f"| {name} | {r['flops_fraction']:.3f} | {r['val']:.3f} | {r['test']:.3f} |" for name, r in rows)
    text = f"""# upcycle demo report

Everything below ran in {seconds / 60:.1f} minutes on {machine["cpu_count"]} CPU cores (torch {machine["torch"]}), from
real checkpoints, offline. Reproduce with `make demo` (or `upcycle demo --out DIR`); the numbers are in `demo.json`.

| | |
|---|---|
{table}

## SmolLM2-135M → MoE → fine-tuned → Mixtral

Every FFN of SmolLM2 became {lm["experts"]} copies behind a router (top-{lm["top_k"]}, renormalised), so the MoE
starts as exactly the dense model (max difference {lm["max_abs_diff"]:.1e}). A short fine-tune on Shakespeare moved
the held-out perplexity (plays never trained on) from {lm["perplexity_before"]:.2f} to {lm["perplexity_after"]:.2f}.
The Mixtral export reloads with `transformers.AutoModelForCausalLM.from_pretrained("{lm["mixtral_dir"]}")`.

Sample from the reloaded model (prompt `{PROMPT.strip()}`, top-p 0.9, temperature 0.8):

```
{lm["sample"]}
```

![fine-tuning curves]({relative(lm["finetune_curves"])})
![expert load]({relative(lm["expert_load_png"])})

## MiniLM-L6 → D2DMoE: compute vs quality

A dense MiniLM classifier (which domain a 64-token passage comes from) made sparse, split into experts, and given
routers. D2DMoE runs a per-token number of experts (those predicted to contribute at least τ of the largest). MACs
are a fraction of the dense model's, routers included. `upcycle bench d2dmoe` sets MoEfication's fixed top-k next
to it, with longer training.

![accuracy vs MACs]({relative(d2d["curves_png"])})

| operating point | MACs / dense | val accuracy | test accuracy |
|---|---|---|---|
| dense | 1.000 | {d2d["dense"]["val"]:.3f} | {d2d["dense"]["test"]:.3f} |
{sweep}
"""
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
    step = Steps(total=9, enabled=progress)
    lm = smollm2_job(out / "smollm2", scale, step, progress)
    d2d = minilm_job(out / "minilm", scale, step, progress)
    seconds = time.perf_counter() - began
    step("report")
    report = write_report(out, lm, d2d, seconds)
    width = max(len(name) for name, _ in summary_rows(lm, d2d))
    print("\n" + "\n".join(f"  {name:<{width}}  {value}" for name, value in summary_rows(lm, d2d)))
    print(f"\nreport: {report.resolve()}  ({seconds / 60:.1f} min)")
    return {"smollm2": lm, "minilm": d2d, "report": str(report), "seconds": seconds}
