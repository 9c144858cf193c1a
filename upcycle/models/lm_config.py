"""``UpcycleLMConfig``: the shape of upcycle's own small causal LM (see ``lm.py`` for the model).

transformers 5 configs are keyword-only dataclasses: each field below is a constructor argument and is written to
``config.json``; ``__post_init__`` fills the derived defaults and validates, and runs inside ``__init__``. Importing
this module costs transformers' configuration machinery only (no ``modeling_utils``).

Dimension letters used across ``upcycle.models``: V vocabulary, d hidden_size, f intermediate_size, L layers,
h query heads, kv key/value heads, hd head_dim, b batch, t new tokens, s keys (cached + new).
"""

from __future__ import annotations

from typing import ClassVar

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig  # the v5 name; ``PretrainedConfig`` is an alias

BYTE_VOCAB = 256  # token ids 0..255 are the bytes themselves; the specials follow


@strict
class UpcycleLMConfig(PreTrainedConfig):
    r"""A Llama-style decoder with sequential or parallel (PaLM / GPT-J) blocks, sized for tiny byte-level LMs.

    ```python
    config = UpcycleLMConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4)
    model = UpcycleLMForCausalLM(config)
    ```
    """

    model_type = "upcycle_lm"
    # Trainer drops the KV cache from eval outputs; its field is "cache" from transformers 5.24, before that
    # "past_key_values"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["cache", "past_key_values"]

    vocab_size: int = BYTE_VOCAB + 3  # V: 256 bytes + bos, eos, pad
    hidden_size: int = 256  # d: width of the residual stream
    intermediate_size: int = 768  # f: MLP hidden width; gate_proj and up_proj are d -> f, down_proj f -> d
    num_hidden_layers: int = 4  # L: decoder blocks
    num_attention_heads: int = 4  # h: query heads
    num_key_value_heads: int | None = None  # kv: key/value heads, h % kv == 0 (GQA); None = h (multi-head)
    head_dim: int | None = None  # hd: width of one head, even (RoPE rotates pairs); None = d // h
    max_position_embeddings: int = 1024  # longest context trained on; RoPE has no table, generate reads this
    rope_theta: float | int = 10_000.0  # RoPE base: wavelengths run from 2π to 2π·rope_theta
    rms_norm_eps: float = 1e-6  # added to the mean square inside RMSNorm
    hidden_act: str = "silu"  # MLP activation: down(act(gate(x)) * up(x)) (SwiGLU for "silu")
    parallel_attention: bool = False  # False: x += attn(n1(x)); x += mlp(n2(x)). True: x += attn(n(x)) + mlp(n(x))
    tie_word_embeddings: bool = False  # lm_head reuses embed_tokens.weight
    attention_bias: bool = False  # biases on q/k/v/o projections
    mlp_bias: bool = False  # biases on gate/up/down projections
    initializer_range: float = 0.02  # std of the normal init of Linear and Embedding weights
    use_cache: bool = True  # eval-mode forwards return a KV cache (generate uses it); training forwards never do
    bos_token_id: int | None = BYTE_VOCAB  # 256
    eos_token_id: int | list[int] | None = BYTE_VOCAB + 1  # 257
    pad_token_id: int | None = BYTE_VOCAB + 2  # 258

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        for name in (*positive, "num_key_value_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}): change one of them, or set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs of channels), got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of num_key_value_heads "
                f"({self.num_key_value_heads}): each key/value head serves a whole group of query heads; choose "
                f"num_key_value_heads among the divisors of {self.num_attention_heads}"
            )
        super().__post_init__(**kwargs)


def _register() -> None:
    """``AutoConfig`` learns ``model_type="upcycle_lm"``; ``exist_ok``: registering again is a no-op."""
    from transformers.models.auto.configuration_auto import AutoConfig

    AutoConfig.register(UpcycleLMConfig.model_type, UpcycleLMConfig, exist_ok=True)


_register()

__all__ = ["UpcycleLMConfig"]
