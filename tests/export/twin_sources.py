"""Tiny random OLMo 2, Granite and Cohere2 models for the FlexOlmo, GraniteMoe(Shared) and Cohere2-MoE export tests:
Llama-sized (``helpers.SIZES``), with every family feature the twin must reproduce set away from its default."""

import torch
from transformers import (
    Cohere2Config,
    Cohere2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
)

from .helpers import SIZES

TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # inside the tiny vocabulary
# Granite's four multipliers, none 1 (and the attention scale not head_dim**-0.5), so a dropped one shows
MULTIPLIERS = dict(embedding_multiplier=2.0, attention_multiplier=0.3, residual_multiplier=0.5, logits_scaling=4.0)
# Cohere2: a window shorter than the test sequences, a full-attention layer between two sliding ones
COHERE2_LAYERS = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"])


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Norm weights and biases away from their 1 / 0 init, so every copied tensor matters; eval mode."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def tiny_olmo2(**overrides) -> Olmo2ForCausalLM:
    return perturbed(Olmo2ForCausalLM(Olmo2Config(**{**SIZES, **TOKENS, **overrides})))


def tiny_granite(**overrides) -> GraniteForCausalLM:
    return perturbed(GraniteForCausalLM(GraniteConfig(**{**SIZES, **TOKENS, **MULTIPLIERS, **overrides})))


def tiny_cohere2(**overrides) -> Cohere2ForCausalLM:
    config = Cohere2Config(**{**SIZES, **TOKENS, **COHERE2_LAYERS, "logit_scale": 0.5, **overrides})
    return perturbed(Cohere2ForCausalLM(config))
