"""``UpcycleBAMConfig``: the shape of a BAM / Branch-Attend-Mix model (see ``bam.py``), upcycle's LM config plus
its experts. Dimension letters: see ``lm_config``; e FFN experts, k experts per token, a attention experts.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict

from .lm_config import UpcycleLMConfig


@strict
class UpcycleBAMConfig(UpcycleLMConfig):
    r"""A decoder whose blocks hold a soft Mixture of Attention and a top-k MoE of SwiGLU experts (arXiv 2408.08274).

    ```python
    config = UpcycleBAMConfig(hidden_size=64, intermediate_size=192, num_attention_heads=4, num_local_experts=4,
                              num_attention_experts=4, parallel_attention=True)
    model = UpcycleBAMForCausalLM(config)
    ```
    """

    model_type = "upcycle_bam"

    num_local_experts: int = 2  # e: FFN experts per block (BAM: the N domain models plus the seed)
    num_experts_per_tok: int = 1  # k: FFN experts each token runs (BAM: top-1)
    norm_topk_prob: bool = False  # divide the k router probabilities by their sum (BAM does not)
    num_attention_experts: int = 2  # a: attention experts per block, every token weighted over all of them
    shared_kv: bool = False  # True: one K, V projection (and KV cache) for all attention experts; they keep Q, O

    def __post_init__(self, **kwargs):
        for name in ("num_local_experts", "num_experts_per_tok", "num_attention_experts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) is larger than num_local_experts "
                f"({self.num_local_experts}): a token cannot run more experts than a block has"
            )
        super().__post_init__(**kwargs)


def _register() -> None:
    """``AutoConfig`` learns ``model_type="upcycle_bam"``; ``exist_ok``: registering again is a no-op."""
    from transformers.models.auto.configuration_auto import AutoConfig

    AutoConfig.register(UpcycleBAMConfig.model_type, UpcycleBAMConfig, exist_ok=True)


_register()

__all__ = ["UpcycleBAMConfig"]
