"""upcycle's own small causal LM: Llama-style decoder blocks, optionally *parallel*, as a Hugging Face model.

What it follows:

* Llama (arXiv 2302.13971): pre-norm RMSNorm, rotary position embeddings (RoPE, arXiv 2104.09864) in the
  half-split layout of transformers' Llama (``rotate_half``), grouped-query attention (GQA, arXiv 2305.13245) and a
  SwiGLU MLP ``down(silu(gate(x)) * up(x))``. With ``parallel_attention=False`` the model computes exactly what
  ``transformers.LlamaForCausalLM`` computes with the same weights (a test checks it).
* Parallel blocks (GPT-J; PaLM, arXiv 2204.02311 §2): ``x + attn(norm(x)) + mlp(norm(x))`` with one shared input
  norm. BAM (Branch-Attend-Mix, arXiv 2408.08274) builds its MoE from such blocks, because attention and experts
  then read the same normalised input and can run side by side.

The module names are Llama's (``model.embed_tokens``, ``model.layers[i].self_attn.{q,k,v,o}_proj``,
``model.layers[i].mlp.{gate,up,down}_proj``, ``model.layers[i].input_layernorm``, ``post_attention_layernorm``
in sequential blocks only, ``model.norm``, ``lm_head``), so upcycle's ``hf_llama`` adapter reads and replaces the
MLPs, and Llama tooling that goes by names works. Attention is always ``scaled_dot_product_attention`` (the
``attn_implementation`` option is ignored); the KV cache is transformers' ``Cache`` API, so ``generate`` works.

Dimension letters: see ``lm_config``. Shapes are in comments, e.g. ``# (b, h, t, hd)``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from ..layers.rotary import apply_rope, repeat_kv, rope_cos_sin
from .lm_config import UpcycleLMConfig

IGNORE_INDEX = -100  # labels with this value add nothing to the loss (padding, prompts)

# transformers renamed the KV cache from ``past_key_values`` to ``cache`` during 5.x (5.24 passes ``cache=`` to
# forward and reads ``outputs.cache``; earlier 5.x use ``past_key_values`` for both). Ours accepts either name and
# returns the cache in the output field that the installed version reads, so ``generate`` keeps its cache.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_argument(past_key_values: Cache | None, kwargs: dict) -> Cache | None:
    """The cache a caller passed, under the old name or the new one (not both)."""
    cache = kwargs.pop("cache", None)
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the KV cache once, as cache or as past_key_values, not both")
    return cache if cache is not None else past_key_values


class UpcycleLMRMSNorm(nn.Module):
    """``weight * x / rms(x)``, computed in fp32 (as Llama): low-precision mean squares lose the small channels.

    The class name contains "RMSNorm" so transformers' default init sets ``weight`` to ones.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def causal_mask(attention_mask: torch.Tensor | None, t: int, past: int, device: torch.device) -> torch.Tensor | None:
    """What each of ``t`` new queries may attend among ``s = past + t`` keys: a boolean ``(b|1, 1, t, s)``, or
    None when plain causal attention from position 0 suffices (SDPA's ``is_causal`` path, the fast one).

    ``attention_mask``: ``(b, s)``, 1 for tokens, 0 for padding (Hugging Face's convention; generate passes the
    whole sequence's mask, cached part included).
    """
    s = past + t
    padded = attention_mask is not None and not bool(attention_mask.all())
    if attention_mask is not None and attention_mask.shape[-1] != s:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[-1]} positions but the keys are {s} "
            f"({past} cached + {t} new): pass the mask of the whole sequence"
        )
    if not padded and past == 0:
        return None
    query_pos = torch.arange(past, s, device=device)[:, None]  # (t, 1): absolute positions of the new tokens
    key_pos = torch.arange(s, device=device)[None, :]  # (1, s)
    mask = key_pos <= query_pos  # (t, s)
    if padded:
        mask = mask & attention_mask[:, None, :].bool()  # (b, t, s)
        # A padding query would see no key at all, and SDPA returns NaN for a row with nothing to attend; letting
        # it see itself keeps its (unused) output finite. Real tokens never attend padding.
        mask = mask | (key_pos == query_pos)
    return mask.unsqueeze(-3)  # (b|1, 1, t, s): broadcast over heads


def default_position_ids(attention_mask: torch.Tensor | None, t: int, past: int, device: torch.device):
    """Positions of the new tokens, counting only real tokens (so a left-padded row starts at 0, as generate does)."""
    if attention_mask is None:
        return torch.arange(past, past + t, device=device)[None]  # (1, t)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]  # (b, t)


class UpcycleLMAttention(nn.Module):
    """Causal self-attention with RoPE, grouped-query heads and an optional KV cache."""

    def __init__(self, config: UpcycleLMConfig, layer_idx: int):
        super().__init__()
        d, hd, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.layer_idx = layer_idx  # which of the cache's layers holds this block's keys and values
        self.head_dim = hd
        self.groups = config.num_attention_heads // config.num_key_value_heads
        self.q_proj = nn.Linear(d, config.num_attention_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, config.num_key_value_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, config.num_key_value_heads * hd, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * hd, d, bias=bias)

    def forward(self, x, cos, sin, mask: torch.Tensor | None, cache: Cache | None) -> torch.Tensor:
        b, t, _ = x.shape  # (b, t, d)
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # (b, h, t, hd)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # (b, kv, t, hd)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # (b, kv, t, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # keys are cached after RoPE, so cached positions never need rotating again
            k, v = cache.update(k, v, self.layer_idx)  # (b, kv, s, hd)
        k, v = repeat_kv(k, self.groups), repeat_kv(v, self.groups)  # (b, h, s, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.head_dim**-0.5)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))  # (b, h, t, hd) -> (b, t, h·hd) -> (b, t, d)


class UpcycleLMMLP(nn.Module):
    """Gated MLP ``down(act(gate(x)) * up(x))``: the layout upcycle's ``hf_llama`` adapter reads."""

    def __init__(self, config: UpcycleLMConfig):
        super().__init__()
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))  # (b, t, d) -> (b, t, f) -> (b, t, d)


class UpcycleLMDecoderLayer(nn.Module):
    """Sequential pre-norm block (Llama) or parallel block (GPT-J / PaLM): see the module docstring."""

    def __init__(self, config: UpcycleLMConfig, layer_idx: int):
        super().__init__()
        self.parallel = config.parallel_attention
        self.input_layernorm = UpcycleLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = self.build_attention(config, layer_idx)
        if not self.parallel:  # a parallel block has one norm: both branches read the same normalised input
            self.post_attention_layernorm = UpcycleLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = self.build_mlp(config)

    def build_attention(self, config: UpcycleLMConfig, layer_idx: int) -> nn.Module:
        """A module ``(x, cos, sin, mask, cache) -> (b, t, d)``; BAM's block returns its Mixture of Attention."""
        return UpcycleLMAttention(config, layer_idx)

    def build_mlp(self, config: UpcycleLMConfig) -> nn.Module:
        """A module ``(b, t, d) -> (b, t, d)``; BAM's block returns an MoE layer."""
        return UpcycleLMMLP(config)

    def forward(self, x, cos, sin, mask: torch.Tensor | None, cache: Cache | None) -> torch.Tensor:
        normed = self.input_layernorm(x)  # (b, t, d)
        if self.parallel:
            return x + self.self_attn(normed, cos, sin, mask, cache) + self.mlp(normed)
        x = x + self.self_attn(normed, cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class UpcycleLMPreTrainedModel(PreTrainedModel):
    config_class = UpcycleLMConfig
    base_model_prefix = "model"  # where UpcycleLMForCausalLM keeps the decoder; adapters and from_pretrained use it
    # device_map="auto" keeps a block (and its residual) on one device; the cache is not a weight to place
    _no_split_modules: ClassVar[list[str]] = ["UpcycleLMDecoderLayer"]
    _skip_keys_device_placement: ClassVar[list[str]] = ["cache", "past_key_values"]  # its name in newer / older 5.x
    _supports_sdpa = True  # the only attention there is; declared so the config does not claim "eager"


class UpcycleLMModel(UpcycleLMPreTrainedModel):
    """The decoder without its head: token ids -> final normalised hidden states ``(b, t, d)``."""

    decoder_layer_class: ClassVar[type[nn.Module]] = UpcycleLMDecoderLayer  # BAM's model swaps the block

    def __init__(self, config: UpcycleLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.decoder_layer_class(config, i) for i in range(config.num_hidden_layers))
        self.norm = UpcycleLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,  # the cache under its newer name ``cache``; anything else generate passes has no effect here
    ) -> BaseModelOutputWithPast:
        past_key_values = cache_argument(past_key_values, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (b, t, d)
        if use_cache is None:  # a training forward has no use for a cache; it would only hold on to memory
            use_cache = self.config.use_cache and not self.training
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        t = x.shape[1]
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, t, past, x.device)  # (b|1, t)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)  # (b|1, t, hd)
        mask = causal_mask(attention_mask, t, past, x.device)  # (b|1, 1, t, s) or None
        for layer in self.layers:
            x = layer(x, cos, sin, mask, past_key_values)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), **{CACHE_FIELD: past_key_values})


class UpcycleLMForCausalLM(UpcycleLMPreTrainedModel, GenerationMixin):
    """The decoder and its LM head: token ids -> next-token logits ``(b, t, V)``, and the loss given labels."""

    # applied when config.tie_word_embeddings: the head reuses the embedding matrix
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    decoder_class: ClassVar[type[nn.Module]] = UpcycleLMModel

    def __init__(self, config: UpcycleLMConfig):
        super().__init__(config)
        self.model = self.decoder_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """``labels`` ``(b, t)``: the input ids themselves (shifted here), with -100 where no loss is wanted.
        ``logits_to_keep``: compute logits for the last N positions only (0 = all; generate passes 1)."""
        past_key_values = cache_argument(past_key_values, kwargs)
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(out.last_hidden_state[:, keep])  # (b, t, V)
        loss = None
        if labels is not None:  # position i predicts token i + 1; fp32 so a low-precision model keeps a precise loss
            if logits.shape[1] != labels.shape[1]:
                raise ValueError(f"labels cover {labels.shape[1]} positions but logits {logits.shape[1]}: with labels, "
                                 "leave logits_to_keep at 0")  # fmt: skip
            shifted = logits[:, :-1].flatten(0, 1).float()  # (b·(t-1), V)
            loss = F.cross_entropy(shifted, labels[:, 1:].flatten().to(logits.device), ignore_index=IGNORE_INDEX)
        result = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: getattr(out, CACHE_FIELD)})
        return result if (self.config.return_dict if return_dict is None else return_dict) else result.to_tuple()


def _register() -> None:
    """``AutoModel`` / ``AutoModelForCausalLM`` build these classes for an upcycle_lm config (``lm_config``
    registered the config itself). ``exist_ok``: registering again is a no-op."""
    from transformers.models.auto.modeling_auto import AutoModel, AutoModelForCausalLM

    AutoModel.register(UpcycleLMConfig, UpcycleLMModel, exist_ok=True)
    AutoModelForCausalLM.register(UpcycleLMConfig, UpcycleLMForCausalLM, exist_ok=True)


_register()

__all__ = [
    "UpcycleLMConfig",
    "UpcycleLMForCausalLM",
    "UpcycleLMModel",
    "UpcycleLMPreTrainedModel",
]
