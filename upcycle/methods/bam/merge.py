"""Several dense LMs -> one MoE: Branch-Train-MiX (BTX, Sukhbaatar et al., arXiv 2403.07816) and Branch-Attend-Mix
(BAM, Zhang et al., arXiv 2408.08274).

The inputs are the seed and its domain branches (N continued-pretrained copies), in expert order; their N+1 FFNs
become the N+1 experts of every block, behind a randomly initialised top-k router (BAM: top-1 with the raw softmax
probability; ``renormalize`` divides by the top-k sum, as Mixtral does).

* **BTX**: everything else (embeddings, attention, norms, LM head) is the average of the inputs. The result is the
  seed's own class with an MoE in each block (the ``hf_llama`` adapter's layout), so ``upcycle.save``/``load`` and
  the Mixtral / Qwen2-MoE exporters take it as they take any converted model.
* **BAM**: the attention projections become N+1 attention experts (:class:`~upcycle.layers.attention
  .MixtureOfAttention`, soft-routed), each with its input model's W_q, W_k, W_v, W_o (``shared_kv=False``, "expert
  KV") or with W_k, W_v averaged and shared (``shared_kv=True``, one KV cache); embeddings, norms and head averaged.
  The result is :class:`~upcycle.models.UpcycleBAMForCausalLM`, a Hugging Face model of its own.

With a single input (the seed alone) both reproduce it exactly: one expert, router probability 1.
Inputs are Llama-style causal LMs (``LlamaForCausalLM`` or upcycle's ``UpcycleLMForCausalLM``, sequential or
parallel blocks) of one architecture. Dimension letters: d model width, h FFN hidden, e = N+1 experts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from pydantic import Field, ValidationError, field_validator
from torch import nn

from ...adapters import Adapter, find_adapter
from ...adapters.base import all_adapters
from ...adapters.dense_ffn import DenseFFN
from ...adapters.hf_common import rope_parameters
from ...config import RUNTIME_FIELDS, StrictModel, explain
from ...errors import UserError, yaml_mapping
from ...layers import Experts, MoE, TopKRouter, describe_moe, moe_layers
from ...layers.routers import SoftAttentionRouter
from ...recipes import recipe_file
from ...record import attach_record, dtype_name, new_record, record_of
from ...registry import Registry
from ..sparse_upcycling.recycling import experts_for, fill_expert

MERGE_METHODS: Registry[Callable] = Registry("merge method")  # name -> fn(models, cfg) -> the mixture


class MergeConfig(StrictModel):
    method: str = Field(
        "bam",
        description="a merge method (upcycle list merge): btx, FFN experts only; bam, FFN and attention experts",
    )
    shared_kv: bool = Field(False, description="bam: attention experts share averaged K, V (one KV cache)")
    top_k: int = Field(1, ge=1, description="FFN experts per token")
    renormalize: bool = Field(False, description="divide the top-k probabilities by their sum (BAM/BTX papers: no)")
    router_init_std: float = Field(0.02, ge=0, description="std of the random router weights (FFN and attention)")
    backend: str = Field("auto", description="expert compute backend (upcycle.list_backends())")
    seed: int = Field(0, description="seed of the router initialisation")
    expert_names: list[str] | None = Field(None, description="a name per input, e.g. seed and domains (provenance)")
    router_init_domains: list[str | list[str]] | None = Field(
        None, description="one calibration dataset per input (or several, pooled), in expert order: each FFN router "
        "row starts as the direction of the mean layer input on that expert's data (upcycle.init_routers_from_data); "
        "None: random",
    )  # fmt: skip
    router_init_examples: int = Field(64, ge=1, description="router_init_domains: calibration examples per dataset")

    @field_validator("method")
    @classmethod
    def _registered(cls, value: str) -> str:
        MERGE_METHODS.entry(value)  # raises with the registered names
        return value


def load_merge_config(source: MergeConfig | dict | str | Path | None = None, **overrides) -> MergeConfig:
    if isinstance(source, MergeConfig):
        data = source.model_dump()
    elif isinstance(source, (str, Path)):
        data = yaml_mapping(recipe_file(source, "merge config"), "merge config")
        data = data.get("merge", data)
        if not isinstance(data, dict):
            raise UserError(f"the merge section of {source} must be a mapping of keys, got {type(data).__name__}")
    else:
        data = dict(source or {})
    data.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return MergeConfig(**data)
    except ValidationError as error:
        raise UserError(explain(error, "merge config")) from None


def merge(models: Sequence[nn.Module], method: str | None = None, config: MergeConfig | dict | str | Path | None = None,
          **overrides) -> nn.Module:  # fmt: skip
    """The seed and its branches (``models``, in expert order) mixed into one MoE by ``method`` ("btx" or "bam").

    Options (``config`` or keywords): ``shared_kv``, ``top_k``, ``renormalize``, ``router_init_std``, ``backend``,
    ``seed``, ``expert_names``, ``router_init_domains``. The inputs are left unchanged."""
    cfg = load_merge_config(config, method=method, **overrides)
    check_inputs(models, cfg)
    if cfg.router_init_domains is not None and len(cfg.router_init_domains) != len(models):
        raise UserError(f"router_init_domains names {len(cfg.router_init_domains)} datasets for {len(models)} "
                        "inputs; give one per input, in expert order")  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)  # the routers' random init
        merged = MERGE_METHODS.get(cfg.method)(models, cfg)
    from ...layers import set_backend

    set_backend(merged, cfg.backend)
    if cfg.router_init_domains is not None:  # mergekit's hidden-state gates; attention routers stay random
        from ...routers_from_data import init_routers_from_data

        init_routers_from_data(merged, domains=cfg.router_init_domains, examples=cfg.router_init_examples,
                               seed=cfg.seed)  # fmt: skip
    return merged


def check_inputs(models: Sequence[nn.Module], cfg: MergeConfig) -> None:
    """Refuse inputs the merge cannot mix, with what to change."""
    if not models:
        raise ValueError("merge needs at least one model (the seed)")
    if cfg.expert_names is not None and len(cfg.expert_names) != len(models):
        raise ValueError(f"expert_names names {len(cfg.expert_names)} experts but {len(models)} models were given")
    if cfg.top_k > len(models):
        raise ValueError(f"top_k={cfg.top_k} is larger than the {len(models)} experts (one per model); lower top_k")
    for i, model in enumerate(models):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        adapter = next((a for a in all_adapters() if model_type in a.merge_model_types), None)
        if adapter is None or not hasattr(model, "lm_head"):
            supported = sorted(t for a in all_adapters() for t in a.merge_model_types)
            raise ValueError(
                f"model {i} is {type(model).__name__} (model_type {model_type!r}); merge takes causal LMs of model "
                f"type {', '.join(supported)}, whose attention and FFNs the mixture reproduces"
            )
        if moe_layers(model):
            raise ValueError(f"model {i} already has MoE layers; merge the dense seed and its dense branches")
    reference = {name: tuple(t.shape) for name, t in models[0].state_dict().items()}
    for i, model in enumerate(models[1:], start=1):
        shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        if type(model) is not type(models[0]):
            raise ValueError(f"model {i} is a {type(model).__name__} but the seed a {type(models[0]).__name__}; "
                             "branches must be copies of the seed")  # fmt: skip
        if shapes != reference:
            differ = sorted(set(shapes.items()) ^ set(reference.items()))[:3]
            raise ValueError(f"model {i} is not the seed's architecture (tensors that differ: {differ}); branches "
                             "must be copies of the seed")  # fmt: skip
        for field in ("hidden_act", "rms_norm_eps", "parallel_attention", "tie_word_embeddings"):
            a, b = getattr(models[0].config, field, None), getattr(model.config, field, None)
            if a != b:
                raise ValueError(f"model {i} has {field}={b!r} but the seed has {a!r}; branches must share the config")


def average(states: Sequence[dict[str, torch.Tensor]], name: str) -> torch.Tensor:
    """The tensor ``name`` averaged over the inputs' state dicts (in fp32, returned in the inputs' dtype)."""
    tensors = [state[name] for state in states]
    return torch.stack([t.float() for t in tensors]).mean(0).to(tensors[0].dtype)


def _averaged_names(model: nn.Module, experts: tuple[str, ...]) -> list[str]:
    """Every tensor of the seed except the ones that become experts (names containing one of ``experts``)."""
    return [name for name in model.state_dict() if not any(part in name for part in experts)]


def _ffn_experts(models: Sequence[nn.Module], adapter: Adapter, site) -> Experts:
    """Block ``site``'s FFNs, one per input, stacked as the experts of one MoE layer (expert j = model j's FFN)."""
    return stack_experts([adapter.read_ffn(model, site) for model in models])


def stack_experts(dense: Sequence[DenseFFN]) -> Experts:
    """The inputs' FFNs of one block as the experts of one MoE layer: expert j = input j's FFN."""
    experts = experts_for(dense[0], len(dense), dense[0].d_hidden)
    for j, ffn in enumerate(dense):
        fill_expert(experts, j, ffn, slice(None))
    return experts


def btx_layer(dense: Sequence[DenseFFN], cfg: MergeConfig) -> MoE:
    """One BTX MoE layer: the inputs' FFNs as experts behind a new top-k router, drawn from the global generator
    (``merge`` seeds it with ``cfg.seed``; layers draw in block order)."""
    experts = stack_experts(dense)
    router = TopKRouter(experts.d_model, len(dense), top_k=cfg.top_k, renormalize=cfg.renormalize,
                        init_std=cfg.router_init_std)  # fmt: skip
    return MoE(router.to(experts.w_up.dtype), experts)


def merge_recipe(cfg: MergeConfig) -> dict:
    """The record's ``merge`` entry: the resolved options and the method's paper."""
    return {**cfg.model_dump(exclude=RUNTIME_FIELDS), "paper": MERGE_METHODS.entry(cfg.method).paper}


def _attach_record(merged: nn.Module, adapter: Adapter, cfg: MergeConfig, layers: dict, seed: nn.Module) -> None:
    """The mixture's record; ``adapter``: the seed's for BTX (the seed's class with MoE layers), the BAM model's.
    Where the seed came from carries over (its tokenizer files)."""
    record = new_record(adapter.name, adapter.describe(merged), dtype_name(merged), layers, merge=merge_recipe(cfg),
                        origin=record_of(seed))  # fmt: skip
    attach_record(merged, record)


@MERGE_METHODS.register("btx", "FFN experts from each model, everything else averaged",
                        "https://arxiv.org/abs/2403.07816")  # fmt: skip
@torch.no_grad()
def _merge_btx(models: Sequence[nn.Module], cfg: MergeConfig) -> nn.Module:
    adapter = find_adapter(models[0])
    merged = copy.deepcopy(models[0])
    state, states = merged.state_dict(), [model.state_dict() for model in models]
    for name in _averaged_names(merged, (f".{adapter.block_modules['ffn']}.",)):
        state[name].copy_(average(states, name))
    layers = {}
    for site in adapter.ffn_sites(merged):
        moe = btx_layer([adapter.read_ffn(model, site) for model in models], cfg).train(merged.training)
        adapter.install(merged, site, moe)
        layers[site.name] = {"index": site.index, **describe_moe(moe)}
    _attach_record(merged, adapter, cfg, layers, models[0])
    return merged


def bam_config(source, num_experts: int, cfg: MergeConfig):
    """The :class:`UpcycleBAMConfig` of a BAM model mixed from ``num_experts`` copies of a model with ``source``
    config (Llama or upcycle_lm)."""
    from ...models import UpcycleBAMConfig

    rope = rope_parameters(source)
    if rope.get("rope_type", "default") != "default":
        raise ValueError(
            f"the seed uses {rope['rope_type']!r} RoPE scaling; upcycle's BAM model implements plain RoPE only"
        )
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "hidden_act",
              "tie_word_embeddings", "attention_bias", "mlp_bias", "initializer_range", "bos_token_id",
              "eos_token_id", "pad_token_id")  # fmt: skip
    values = {field: getattr(source, field) for field in fields if getattr(source, field, None) is not None}
    return UpcycleBAMConfig(
        **values, rope_theta=rope["rope_theta"],
        parallel_attention=bool(getattr(source, "parallel_attention", False)), num_local_experts=num_experts,
        num_experts_per_tok=cfg.top_k, norm_topk_prob=cfg.renormalize, num_attention_experts=num_experts,
        shared_kv=cfg.shared_kv,
    )  # fmt: skip


def router_draws(cfg: MergeConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """BAM's router weights, N(0, router_init_std), from a generator of their own seeded with ``cfg.seed``, drawn in
    module order: the same values whether the model is built whole in memory (after the random init of every other
    weight) or streamed layer by layer (``upcycle.methods.bam.streaming``)."""
    generator = torch.Generator().manual_seed(cfg.seed)

    def draw(like: torch.Tensor) -> torch.Tensor:  # a router weight of ``like``'s shape and dtype
        return torch.empty(like.shape, dtype=like.dtype).normal_(0.0, cfg.router_init_std, generator=generator)

    return draw


@MERGE_METHODS.register("bam", "FFN and soft-routed attention experts (expert or shared KV), the rest averaged",
                        "https://arxiv.org/abs/2408.08274")  # fmt: skip
@torch.no_grad()
def _merge_bam(models: Sequence[nn.Module], cfg: MergeConfig) -> nn.Module:
    from ...models import UpcycleBAMForCausalLM

    seed = models[0]
    dtype = next(seed.parameters()).dtype
    bam = UpcycleBAMForCausalLM(bam_config(seed.config, len(models), cfg)).to(dtype).train(seed.training)
    draw = router_draws(cfg)
    for module in bam.modules():  # the routers are the only weights that stay at a random init
        if isinstance(module, TopKRouter | SoftAttentionRouter):
            module.gate.weight.copy_(draw(module.gate.weight))
    state, states = bam.state_dict(), [model.state_dict() for model in models]
    adapter = find_adapter(seed)
    ffn, attention_name = adapter.block_modules["ffn"], adapter.block_modules["attention"]
    for name in _averaged_names(seed, (f".{ffn}.", f".{attention_name}.")):
        state[name].copy_(average(states, name))
    for site in adapter.ffn_sites(seed):
        prefix = site.name.removesuffix(ffn)  # the layer's prefix, e.g. "model.layers.{i}."
        block = bam.get_submodule(prefix.rstrip("."))  # upcycle's BAM model: mlp (MoE) and self_attn (MoA)
        block.mlp.experts.load_state_dict(_ffn_experts(models, adapter, site).state_dict())
        attention = block.self_attn
        for part, projection in zip("qkvo", adapter.attention_projections, strict=True):
            stacked = torch.stack([s[f"{prefix}{attention_name}.{projection}.weight"] for s in states])  # [e, out, in]
            shared = cfg.shared_kv and part in "kv"
            getattr(attention, f"w_{part}").copy_(stacked.float().mean(0, keepdim=True) if shared else stacked)
            bias = getattr(attention, f"b_{part}")
            if bias is not None:
                stacked = torch.stack([s[f"{prefix}{attention_name}.{projection}.bias"] for s in states])  # [e, out]
                bias.copy_(stacked.float().mean(0, keepdim=True) if shared else stacked)
    _attach_record(bam, find_adapter(bam), cfg, {}, seed)
    return bam
