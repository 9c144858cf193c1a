"""Tiny random models of every Hugging Face family upcycle converts (d = 32, 2 layers), built in-session, and the
export each one should get from ``--format auto``: its exact MoE twin in transformers, else the generic class."""

from __future__ import annotations

import torch
import transformers

_DECODER = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "pad_token_id": 0,
            "bos_token_id": 1, "eos_token_id": 2}  # fmt: skip
_ENCODER = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 80, "pad_token_id": 1}  # fmt: skip
_SPECIAL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

# family -> (model class, config class, config arguments, the format auto picks)
HF_FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", _DECODER, "mixtral"),
    "mistral": ("MistralForCausalLM", "MistralConfig", _DECODER, "mixtral"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", _DECODER, "qwen2_moe"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", _DECODER, "qwen3_moe"),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", {**_DECODER, "head_dim": 8}, "hf_generic"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", {**_DECODER, "head_dim": 8, "sliding_window": 4}, "hf_generic"),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", {**_DECODER, "head_dim": 8, "sliding_window": 4}, "hf_generic"),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", _DECODER, "flex_olmo"),
    "granite": (
        "GraniteForCausalLM",
        "GraniteConfig",
        {**_DECODER, "embedding_multiplier": 2.0, "residual_multiplier": 0.5, "logits_scaling": 4.0},
        "granitemoe",
    ),
    "smollm3": ("SmolLM3ForCausalLM", "SmolLM3Config", {**_DECODER, "no_rope_layer_interval": 2}, "hf_generic"),
    "stablelm": ("StableLmForCausalLM", "StableLmConfig", _DECODER, "hf_generic"),
    "cohere2": ("Cohere2ForCausalLM", "Cohere2Config", _DECODER, "cohere2_moe"),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", _DECODER, "mixtral"),
    "ernie4_5": ("Ernie4_5ForCausalLM", "Ernie4_5Config", {**_DECODER, "head_dim": 16}, "ernie4_5_moe"),
    "hunyuan_v1_dense": (
        "HunYuanDenseV1ForCausalLM",
        "HunYuanDenseV1Config",
        {**_DECODER, "head_dim": 16},
        "hunyuan_v1_moe",
    ),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", {**_DECODER, "rotary_pct": 0.5}, "hf_generic"),
    "gpt2": (
        "GPT2LMHeadModel",
        "GPT2Config",
        {"vocab_size": 97, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64},
        "hf_generic",
    ),
    "bert": ("BertModel", "BertConfig", {**_ENCODER, "pad_token_id": 0}, "hf_generic"),
    "roberta": ("RobertaModel", "RobertaConfig", _ENCODER, "hf_generic"),
    "xlm_roberta": ("XLMRobertaModel", "XLMRobertaConfig", _ENCODER, "hf_generic"),
    "electra": ("ElectraModel", "ElectraConfig", _ENCODER, "hf_generic"),
    "distilbert": (
        "DistilBertModel",
        "DistilBertConfig",
        {
            "vocab_size": 97,
            "dim": 32,
            "hidden_dim": 64,
            "n_layers": 2,
            "n_heads": 4,
            "max_position_embeddings": 64,
            "pad_token_id": 0,
        },
        "hf_generic",
    ),
    "modernbert": (
        "ModernBertModel",
        "ModernBertConfig",
        {**_ENCODER, **_SPECIAL, "cls_token_id": 1, "sep_token_id": 2},
        "hf_generic",
    ),
}


def build_hf(family: str) -> torch.nn.Module:
    """The family's tiny model in eval mode, with non-trivial norms and biases so every copied tensor matters."""
    model_class, config_class, arguments, _ = HF_FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**arguments))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def is_causal_lm(family: str) -> bool:
    return HF_FAMILIES[family][0].endswith(("ForCausalLM", "LMHeadModel"))
