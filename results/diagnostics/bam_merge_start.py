"""How the BAM / BTX mixture of SmolLM2-135M starts, before the mix phase: the FFN router's weighting decides it.

The seed and the three domain branches of ``upcycle bench bam`` (full scale, cached by its branch phase) are merged as
BTX and as BAM with expert KV under three FFN routings, each with a fresh random router: top-1 weighted by the raw
softmax probability (both papers' Switch-style choice, upcycle's default), top-1 renormalised (weight 1) and top-2
renormalised (the BTX paper's SoftMax(TopK(Wx))). Validation perplexity per domain, 8 sequences of 128 tokens each,
bf16 autocast; the test split is not read.

    make install data && .venv/bin/upcycle bench bam    # its branch phase first (about 30 min), then:
    .venv/bin/python results/diagnostics/bam_merge_start.py       # ~3 min on 2 cores; writes the JSON beside it
"""

import json
from pathlib import Path

import torch

import upcycle  # noqa: F401  (registers the families before transformers models load)
from upcycle.export import load
from upcycle.methods.bam import bench, load_recipe
from upcycle.methods.bam.evaluate import domain_perplexity
from upcycle.methods.bam.pipeline import merged
from upcycle.sources import cache_root

ROUTINGS = {"top-1 raw": (1, False), "top-1 renormalised": (1, True), "top-2 renormalised": (2, True)}


def perplexity(model, recipe) -> dict:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return {k: round(v, 2) for k, v in domain_perplexity(model.eval(), recipe, "val").items()}


def main() -> None:
    work = cache_root() / "bench" / "bam-full" / "seed-0"
    base = {**bench.FULL.recipe, "seed": 0, "eval_sequences": 8}
    recipe = load_recipe(base)
    seed = bench.seed_model(bench.FULL, progress=False)
    branches = {d: load(str(work / f"branch-{d}" / "model")).eval() for d in recipe.domains}
    rows = {"seed": perplexity(seed, recipe)}
    rows.update({f"branch {d}": perplexity(branch, recipe) for d, branch in branches.items()})
    for variant in ("btx", "bam_expert_kv"):
        for name, (top_k, renormalize) in ROUTINGS.items():
            routed = load_recipe({**base, "top_k": top_k, "renormalize": renormalize, "btx_top_k": None,
                                  "btx_renormalize": None})  # fmt: skip
            rows[f"{variant}, {name}"] = perplexity(merged(seed, branches, routed, variant), routed)
            print(f"{variant}, {name}", rows[f"{variant}, {name}"], flush=True)
    out = Path(__file__).with_suffix(".json")
    out.write_text(json.dumps({"split": "val", "sequences_per_domain": 8, "perplexity": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
