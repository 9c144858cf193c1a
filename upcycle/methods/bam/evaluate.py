"""What the BAM / BTX comparison measures of each model: held-out perplexity per domain and its average, parameters
(total and active per token), MACs per token, and CPU inference latency (a batched forward and greedy decoding
with the KV cache)."""

from __future__ import annotations

import statistics

import torch
from torch import nn

from ...eval import count_macs, count_parameters, time_inference
from ...eval.held_out import HeldOut
from ...layers import moe_layers
from ...layers.attention import MixtureOfAttention
from .recipe import BAMRecipe


def domain_perplexity(model: nn.Module, recipe: BAMRecipe, split: str) -> dict[str, float]:
    """``{domain: perplexity, ..., "average": their mean}`` on held-out files of ``split`` (never trained on)."""
    seq_len = recipe.mix_config().seq_len
    result = {}
    for domain in recipe.domains:
        held_out = HeldOut(model, recipe.data, split, recipe.eval_sequences, seq_len,
                           data_options=recipe.data_options(domain=domain))  # fmt: skip
        result[domain] = held_out.metric(model)
    result["average"] = statistics.fmean(result[d] for d in recipe.domains)
    return result


def normalised_entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy of distributions ``p [..., e]`` over e experts divided by log e: 1 uniform, 0 one expert."""
    p = p.float().clamp_min(0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    return -(p * p.clamp_min(1e-12).log()).sum(-1) / torch.log(torch.tensor(float(p.shape[-1])))


@torch.no_grad()
def expert_usage(model: nn.Module, recipe: BAMRecipe, split: str = "val") -> dict[str, dict]:
    """Per domain, how the mixture uses its experts (order: seed, then the recipe's domains), over all blocks:
    ``ffn`` the share of executed top-k assignments each FFN expert receives, ``attention`` the mean soft-router
    weight of each attention expert (None without attention experts), and the router statistics that show a
    collapse: ``ffn_load_entropy`` (entropy of the ``ffn`` shares / log e: 1 balanced, 0 every token on one expert),
    ``ffn_token_entropy`` (mean per-token entropy of the FFN router's softmax / log e: low = confident routing),
    ``ffn_top_probability`` (mean probability of the top expert: the scale a top-1 raw-probability router gives the
    FFN output) and ``attention_token_entropy`` (the same for the soft attention router). ``{}`` for a dense
    model."""
    ffn_layers = [layer for _, layer in moe_layers(model)]
    attention_layers = [m for m in model.modules() if isinstance(m, MixtureOfAttention)]
    if not ffn_layers:
        return {}
    experts = ffn_layers[0].router.num_experts
    usage = {}
    model.eval()
    for domain in recipe.domains:
        held_out = HeldOut(model, recipe.data, split, recipe.eval_sequences, recipe.mix_config().seq_len,
                           data_options=recipe.data_options(domain=domain))  # fmt: skip
        ffn, attention = torch.zeros(experts), torch.zeros(experts)
        token_entropy, top_probability, attention_entropy = [], [], []
        for batch in held_out.batches():
            model(input_ids=batch["input_ids"])
            for layer in ffn_layers:
                routing = layer.last_routing
                ffn += torch.bincount(routing.indices[routing.executed()], minlength=experts).float()
                token_entropy.append(normalised_entropy(routing.router_probs).mean())
                top_probability.append(routing.router_probs.float().max(-1).values.mean())
            for layer in attention_layers:
                attention += layer.last_routing.weights.float().sum(0)
                attention_entropy.append(normalised_entropy(layer.last_routing.weights).mean())
        usage[domain] = {
            "ffn": (ffn / ffn.sum()).tolist(),
            "attention": (attention / attention.sum()).tolist() if attention_layers else None,
            "ffn_load_entropy": float(normalised_entropy(ffn)),
            "ffn_token_entropy": float(torch.stack(token_entropy).mean()),
            "ffn_top_probability": float(torch.stack(top_probability).mean()),
            "attention_token_entropy": float(torch.stack(attention_entropy).mean()) if attention_layers else None,
        }
    return usage


def example_ids(model: nn.Module, recipe: BAMRecipe, sequences: int) -> torch.Tensor:
    """The first ``sequences`` held-out validation sequences of the mixture ``[n, seq_len]``."""
    held_out = HeldOut(model, recipe.data, "val", sequences, recipe.mix_config().seq_len,
                       data_options=recipe.data_options(weights=dict.fromkeys(recipe.domains, 1.0)))  # fmt: skip
    return next(iter(held_out.batches(1)))["input_ids"][:sequences]


@torch.no_grad()
def model_costs(model: nn.Module, ids: torch.Tensor, timing: bool = True, new_tokens: int = 32) -> dict:
    """Parameters, MACs per token on ``ids [b, t]``, and (``timing``) the median forward latency on ``ids`` and the
    median greedy-decoding time per new token for one sequence (KV cache on)."""
    params = count_parameters(model)
    costs = {
        "params_total": params["total"],
        "params_active": params["active"],
        "macs_per_token": count_macs(model, {"input_ids": ids}).total / ids.shape[1],
    }
    if timing:
        model.eval()
        costs["forward_ms"] = time_inference(lambda: model(input_ids=ids), warmup=1, repeats=5)["median_ms"]
        prompt = ids[:1, :16]

        def decode() -> None:
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0)  # fmt: skip

        decode_ms = time_inference(decode, warmup=1, repeats=3)["median_ms"]
        costs["decode_ms_per_token"] = decode_ms / new_tokens
    return costs
