"""Why granular sparse upcycling loses ground in a short fine-tune: its tied router rows untie.

Granular upcycling (arXiv 2410.07524) splits each FFN copy into G shards and ties the router rows of a copy's shards,
so at conversion renormalised top-G picks one whole copy and the MoE is the dense model. Training updates each row
on its own (Adam moves a fresh router's rows fast), the ties break, and tokens start to pick shards of *different*
copies: shard 1 of copy A with shard 1 of copy B computes the first half of the FFN twice and the second half never.

This run measures it on a small byte-level LM (d 64, 2 blocks, pre-trained here for 600 steps on the text mixture),
then 150 steps of the same recipe per model (AdamW 3e-4, batch 16 × 64): validation perplexity before and after, and
for the granular models the share of tokens whose top-2 shards still form one whole copy.

    .venv/bin/python results/diagnostics/granular_router_ties.py     # ~2 min on one core; writes the JSON beside it
"""

import json
import tempfile
from pathlib import Path

import torch

import upcycle
from upcycle.eval.held_out import HeldOut
from upcycle.layers import moe_layers
from upcycle.pretrain import build_dense
from upcycle.record import copy_model
from upcycle.train import train

SIZES = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2}  # fmt: skip
RECIPE = {"data": "text_mixture", "batch_size": 16, "seq_len": 64, "warmup": 0.05, "weight_decay": 0.1,
          "log_every": 50, "eval_batches": 2, "checkpoints": False, "seed": 0}  # fmt: skip
GRANULAR = {"num_experts": 4, "top_k": 2, "options": {"granularity": 2}}  # 8 half-width experts, top-2 = one copy
MODELS = {  # name -> (sparse upcycling arguments or None for the dense model, router trained)
    "dense continued": (None, True),
    "granular, 4 copies x 2 shards, top-2": (GRANULAR, True),
    "granular, router frozen": (GRANULAR, False),
    "4 copies, top-1": ({"num_experts": 4, "top_k": 1}, True),
    "4 copies, top-2": ({"num_experts": 4, "top_k": 2}, True),
}


def whole_copy_share(model, held_out: HeldOut, shards: int) -> float:
    """Share of routed tokens whose chosen shards all belong to one copy (1.0 at conversion)."""
    shares = []

    def record(module, args, routing):
        copies = routing.indices // shards  # [t, k]
        shares.append(float((copies == copies[:, :1]).all(-1).float().mean()))

    hooks = [layer.router.register_forward_hook(record) for _, layer in moe_layers(model)]
    held_out.metric(model)
    for hook in hooks:
        hook.remove()
    return round(sum(shares) / len(shares), 3)


def main() -> dict:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as work:
        dense = build_dense("lm_tiny", seed=0, **SIZES)
        train(dense, {**RECIPE, "steps": 600, "lr": 3e-3}, Path(work) / "pretrain", progress=False)
        dense.eval()
        held_out = HeldOut(dense, "text_mixture", "val", 32, RECIPE["seq_len"])
        results = {}
        for name, (arguments, router_trains) in MODELS.items():
            if arguments is None:
                model = copy_model(dense)
            else:
                model = upcycle.convert(dense, method="sparse_upcycling", layers="all", progress=False, **arguments)
            for parameter_name, parameter in model.named_parameters():
                if ".router." in parameter_name:
                    parameter.requires_grad_(router_trains)
            row = {"val_ppl_start": round(held_out.metric(model), 3)}
            train(model, {**RECIPE, "steps": 150, "lr": 3e-4}, Path(work) / "run", progress=False)
            row["val_ppl_end"] = round(held_out.metric(model.eval()), 3)
            if arguments is not None and "options" in arguments:
                row["whole_copy_share"] = whole_copy_share(model, held_out, arguments["options"]["granularity"])
            results[name] = row
            print(name, row, flush=True)
    return results


if __name__ == "__main__":
    results = main()
    (Path(__file__).with_suffix(".json")).write_text(json.dumps(results, indent=1) + "\n")
