"""Tiny upcycle LMs (d <= 64) with weights large enough that greedy choices and logits differ clearly."""

import torch

from upcycle.models.lm import UpcycleLMConfig, UpcycleLMForCausalLM

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64}  # fmt: skip
BLOCKS = {"sequential": False, "parallel": True}


def tiny_config(parallel: bool = False, **overrides) -> UpcycleLMConfig:
    return UpcycleLMConfig(**{**TINY, "parallel_attention": parallel, **overrides})


def tiny_lm(parallel: bool = False, seed: int = 0, **overrides) -> UpcycleLMForCausalLM:
    """Eval-mode model whose weights are N(0, 0.2) (norms 1 ± 0.1, biases too), not the near-uniform 0.02 init, so
    logits spread out and greedy decoding has no near-ties that float rounding could flip."""
    torch.manual_seed(seed)
    model = UpcycleLMForCausalLM(tiny_config(parallel, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2)
    return model.eval()


def byte_ids(*texts: str) -> list[torch.Tensor]:
    return [torch.tensor([list(text.encode())]) for text in texts]
