"""Tiny models of every supported family, built in-session (d <= 64), with the inputs to run them."""

import torch
import transformers

from upcycle.sources import load_timm

TIMM_CASES = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}),
    "deit": ("deit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}),
    "eva02_swiglu_packed": ("eva02_tiny_patch14_224", {"img_size": 28, "depth": 2, "embed_dim": 48, "num_heads": 3}),
    "eva02_swiglu_norm": (
        "eva02_tiny_patch14_224",
        {"img_size": 28, "depth": 2, "embed_dim": 48, "num_heads": 3, "scale_mlp": True},
    ),
    "convnext_linear": ("convnext_atto", {"depths": [1, 1, 2, 1], "dims": [16, 24, 32, 48]}),
    "convnext_conv": ("convnext_atto", {"depths": [1, 1, 2, 1], "dims": [16, 24, 32, 48], "conv_mlp": True}),
}

_LM = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
       "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}  # fmt: skip
HF_CASES = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**_LM)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**_LM)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_LM)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=3, n_head=4, n_positions=64)
    ),
    "bert": lambda: transformers.BertModel(
        transformers.BertConfig(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=64,
        )
    ),
    "bert_classifier": lambda: transformers.BertForSequenceClassification(
        transformers.BertConfig(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            num_labels=3,
        )
    ),
}
ALL_CASES = [*TIMM_CASES, *HF_CASES]


def build(case: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if case in TIMM_CASES:
        arch, kwargs = TIMM_CASES[case]
        model = load_timm(arch, None, False, {"num_classes": 5, **kwargs})
    else:
        model = HF_CASES[case]()
    with torch.no_grad():  # non-trivial biases and norms, so every tensor the conversion copies matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()
