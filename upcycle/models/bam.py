"""upcycle's BAM model (Zhang et al., "BAM! Just Like That: Simple and Efficient Parameter Upcycling for Mixture of
Experts", arXiv 2408.08274) as a Hugging Face model: ``AutoModelForCausalLM.from_pretrained(dir)`` builds it for a
``model_type="upcycle_bam"`` checkpoint once upcycle is installed, and ``generate`` works.

It is upcycle's own LM (``lm.py``: RoPE, GQA, RMSNorm, sequential or parallel blocks) with two swaps per block:

* attention -> :class:`~upcycle.layers.attention.MixtureOfAttention`: ``num_attention_experts`` attention experts,
  every token mixing all of them with a soft router; with ``shared_kv`` they share K, V and one KV cache;
* MLP -> :class:`~upcycle.layers.MoE`: a top-k router (``norm_topk_prob``: renormalise or not) over
  ``num_local_experts`` SwiGLU experts, the MoE layer the rest of upcycle trains, counts and reports.

Tensor names per block i: ``model.layers.{i}.self_attn.{w_q,w_k,w_v,w_o}`` (stacked ``[e, out, in]``),
``model.layers.{i}.self_attn.router.gate.weight [a, d]``, ``model.layers.{i}.mlp.router.gate.weight [e, d]``,
``model.layers.{i}.mlp.experts.{w_gate,w_up,w_down}``; norms, embeddings and head as in ``lm.py``. The MoE layers'
aux losses (load balancing, z-loss) are read by upcycle's training loop (``collect_aux_losses``), not added here.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from ..layers import MoE, TopKRouter
from ..layers.attention import MixtureOfAttention
from ..layers.experts import Experts
from .bam_config import UpcycleBAMConfig
from .lm import UpcycleLMDecoderLayer, UpcycleLMForCausalLM, UpcycleLMModel, UpcycleLMPreTrainedModel


class UpcycleBAMDecoderLayer(UpcycleLMDecoderLayer):
    """upcycle's LM block with a Mixture of Attention and an MoE in place of its attention and MLP."""

    def build_attention(self, config: UpcycleBAMConfig, layer_idx: int) -> nn.Module:
        return MixtureOfAttention(
            config.hidden_size, config.num_attention_experts, config.num_attention_heads,
            config.num_key_value_heads, config.head_dim, shared_kv=config.shared_kv, bias=config.attention_bias,
            router_init_std=config.initializer_range, layer_idx=layer_idx,
        )  # fmt: skip

    def build_mlp(self, config: UpcycleBAMConfig) -> nn.Module:
        from ..layers.activations import from_hf

        router = TopKRouter(config.hidden_size, config.num_local_experts, top_k=config.num_experts_per_tok,
                            renormalize=config.norm_topk_prob, init_std=config.initializer_range)  # fmt: skip
        experts = Experts(config.num_local_experts, config.hidden_size, config.intermediate_size,
                          activation=from_hf(config.hidden_act), gated=True, bias=config.mlp_bias)  # fmt: skip
        return MoE(router, experts)


class UpcycleBAMPreTrainedModel(UpcycleLMPreTrainedModel):
    config_class = UpcycleBAMConfig
    _no_split_modules: ClassVar[list[str]] = ["UpcycleBAMDecoderLayer"]


class UpcycleBAMModel(UpcycleBAMPreTrainedModel, UpcycleLMModel):
    """The BAM decoder without its head: token ids -> final normalised hidden states ``(b, t, d)``."""

    decoder_layer_class = UpcycleBAMDecoderLayer


class UpcycleBAMForCausalLM(UpcycleBAMPreTrainedModel, UpcycleLMForCausalLM):
    """The BAM decoder and its LM head: token ids -> next-token logits ``(b, t, V)``, and the loss given labels."""

    decoder_class = UpcycleBAMModel


def _register() -> None:
    """``AutoModel`` / ``AutoModelForCausalLM`` build these classes for an upcycle_bam config."""
    from transformers.models.auto.modeling_auto import AutoModel, AutoModelForCausalLM

    AutoModel.register(UpcycleBAMConfig, UpcycleBAMModel, exist_ok=True)
    AutoModelForCausalLM.register(UpcycleBAMConfig, UpcycleBAMForCausalLM, exist_ok=True)


_register()

__all__ = ["UpcycleBAMConfig", "UpcycleBAMForCausalLM", "UpcycleBAMModel", "UpcycleBAMPreTrainedModel"]
