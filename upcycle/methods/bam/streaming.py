"""Streaming merges: BTX (Sukhbaatar et al., arXiv 2403.07816) and BAM (Zhang et al., arXiv 2408.08274) mixed
straight from the seed's and the branches' safetensors checkpoints, one block of the N inputs in memory instead of
N whole models plus the mixture (6 GB for SmolLM2-135M and three branches).

The output is bitwise what ``upcycle.save(upcycle.merge(models, ...))`` writes for the loaded inputs (BTX in
``format="mixtral"``: what ``upcycle.export(that, format="mixtral")`` writes), tokenizer files included, and every FFN
expert is checked against the input FFN it copies (:mod:`upcycle.stream.check`). Averaged tensors are the inputs'
mean in float32, as ``merge`` computes it. BTX's routers draw from the global generator seeded with ``cfg.seed``,
block by block, as ``merge`` does; BAM's from a generator of their own, in module order
(:func:`~.merge.router_draws`). Dimension letters: e = N experts (one per input), d model width.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...adapters import find_adapter
from ...adapters.base import FFNSite
from ...atomic import atomic_directory
from ...config import load_convert_config
from ...errors import check_finite
from ...export.saving import write_record
from ...layers import MoE, describe_moe
from ...layers.routers import SoftAttentionRouter
from ...layers.routers.topk import TopKRouter
from ...record import dtype_name, new_record
from ...stream import STREAM_SHARD_BYTES, Plan, Producer, Streamed, one_thread, write
from ...stream.check import DEFAULT_RTOL, EquivalenceCheck, Probe
from ...stream.checkpoint import ReservingShardWriter
from ...stream.native import CORRUPT, check_written, copy_tokenizer_files
from ...stream.plan import ffn_bytes, first_dtype, meta_model, prepare, read_dense_ffn
from .merge import (
    MergeConfig,
    average,
    bam_config,
    btx_layer,
    load_merge_config,
    merge_recipe,
    router_draws,
    stack_experts,
)

SAME_CONFIG = ("hidden_act", "rms_norm_eps", "tie_word_embeddings", "model_type")  # branches must share these


def merge_streaming(
    sources: Sequence[str | Path],
    out_dir: str | Path,
    method: str | None = None,
    config: MergeConfig | dict | str | Path | None = None,
    *,
    format: str = "upcycle",
    layout: str | None = None,
    check: bool = True,
    rtol: float = DEFAULT_RTOL,
    overwrite: bool = False,
    progress: bool = True,
    max_shard_bytes: int = STREAM_SHARD_BYTES,
    **overrides,
) -> Streamed:
    """Mix the checkpoint folders ``sources`` (the seed, then its branches, in expert order) into ``out_dir`` as
    ``upcycle.merge`` would, tensor by tensor. ``method``, ``config`` and ``overrides`` are those of
    ``upcycle.merge``; ``format="mixtral"`` (BTX with renormalised top-k only) writes the Mixtral checkpoint
    directly. ``check``: every FFN expert must reproduce its input's FFN within ``rtol``, else nothing is written."""
    from ...stream import check_format

    cfg = load_merge_config(config, method=method, **overrides)
    check_format(format, layout)
    if cfg.method != "btx" and format != "upcycle":
        raise ValueError(f"a {cfg.method} mixture is upcycle's own model class: stream it in format 'upcycle', then "
                         "export it (upcycle export DIR --format bam)")  # fmt: skip
    out_dir = Path(out_dir)
    plans = input_plans(sources, out_dir, cfg, overwrite)
    checker = EquivalenceCheck(rtol) if check else None
    with one_thread(), atomic_directory(out_dir, overwrite=overwrite) as staging:
        total = plans[0].total
        with tqdm(total=total, desc=f"stream {cfg.method} of {len(plans)}", unit="tensor", disable=not progress,
                  leave=False) as bar:  # fmt: skip
            if cfg.method == "btx":
                with torch.random.fork_rng():
                    torch.manual_seed(cfg.seed)  # the routers' draws, as merge seeds them
                    write(Mixing(plans, cfg), staging, format, layout, max_shard_bytes, bar, checker)
            else:
                write_bam(plans, cfg, staging, max_shard_bytes, bar, checker)
    worst_layer, worst = checker.worst if checker is not None else (None, None)
    return Streamed(out_dir, format, worst_layer, worst)


def input_plans(sources: Sequence[str | Path], out_dir: Path, cfg: MergeConfig, overwrite: bool) -> list[Plan]:
    """Each input read and checked from its headers: one family that merges, the seed's tensors and config."""
    if not sources:
        raise ValueError("merge needs at least one model (the seed)")
    if cfg.expert_names is not None and len(cfg.expert_names) != len(sources):
        raise ValueError(f"expert_names names {len(cfg.expert_names)} experts but {len(sources)} models were given")
    if cfg.top_k > len(sources):
        raise ValueError(f"top_k={cfg.top_k} is larger than the {len(sources)} experts (one per model); lower top_k")
    every_ffn = load_convert_config(None, layers="all")  # each input's plan: every FFN is a site
    plans = [prepare(source, out_dir, every_ffn, overwrite) for source in sources]
    seed = plans[0]
    model_type = seed.source["config"].get("model_type")
    if model_type not in seed.adapter.merge_model_types:
        streamed = [t for t in seed.adapter.merge_model_types if t in seed.adapter.streaming_model_types]
        raise ValueError(f"{seed.source_dir} has model_type {model_type!r}; merging streams model types "
                         f"{', '.join(streamed)} (merge other models in memory with upcycle.merge)")  # fmt: skip
    shapes = {name: info.shape for name, info in seed.checkpoint.tensors.items()}
    for i, plan in enumerate(plans[1:], start=1):
        theirs = {name: info.shape for name, info in plan.checkpoint.tensors.items()}
        if theirs != shapes:
            differ = sorted(set(theirs.items()) ^ set(shapes.items()))[:3]
            raise ValueError(f"model {i} ({plan.source_dir}) is not the seed's architecture (tensors that differ: "
                             f"{differ}); branches must be copies of the seed")  # fmt: skip
        for field in SAME_CONFIG:
            a, b = seed.source["config"].get(field), plan.source["config"].get(field)
            if a != b:
                raise ValueError(f"model {i} has {field}={b!r} but the seed has {a!r}; branches must share the config")
    return plans


class Mixing(Producer):
    """BTX: the inputs' average outside the FFNs; each block's FFNs as the experts of one MoE layer."""

    def __init__(self, plans: list[Plan], cfg: MergeConfig):
        self.plan, self.plans, self.cfg = plans[0], plans, cfg
        self.recipe = {"merge": merge_recipe(cfg)}

    def backbone(self, name: str) -> torch.Tensor:
        return average([plan.checkpoint.read([name]) for plan in self.plans], name)

    def ffns(self, site: FFNSite) -> list:
        return [read_dense_ffn(plan.checkpoint, site, plan.activation, plan.layout) for plan in self.plans]

    def layer(self, site: FFNSite, check: EquivalenceCheck | None) -> tuple[MoE, Probe | None]:
        ffns = self.ffns(site)
        moe = btx_layer(ffns, self.cfg).eval()
        return moe, None if check is None else check.probe_mixture(ffns)

    def layer_spec(self) -> dict:
        with torch.random.fork_rng():  # the first layer's router draw must stay for the first layer
            return describe_moe(btx_layer(self.ffns(self.plan.sites[0]), self.cfg))

    def layer_bytes(self, site: FFNSite) -> int:
        return len(self.plans) * ffn_bytes(self.plan.checkpoint, site)


def write_bam(plans: list[Plan], cfg: MergeConfig, staging: Path, max_shard_bytes: int, bar: tqdm,
              check: EquivalenceCheck | None) -> None:  # fmt: skip
    """BAM: the inputs' average outside attention and FFNs; each block's attention projections stacked as attention
    experts (K, V averaged with ``shared_kv``) and its FFNs as FFN experts; routers drawn in module order."""
    import transformers

    from ...models import UpcycleBAMForCausalLM

    seed = plans[0]
    dtype = first_dtype(seed)
    config = bam_config(transformers.AutoConfig.from_pretrained(seed.source_dir), len(plans), cfg)
    bam = meta_model(lambda: UpcycleBAMForCausalLM(config).to(dtype))
    routers = [(name, module.gate.weight) for name, module in bam.named_modules()
               if isinstance(module, TopKRouter | SoftAttentionRouter)]  # fmt: skip
    draw = router_draws(cfg)
    written = {}
    with ReservingShardWriter(staging, max_shard_bytes) as writer:
        for step, count in seed.steps:
            if isinstance(step, str):
                outputs = backbone_or_attention(step, plans, cfg)
            else:
                writer.reserve(2 * len(plans) * ffn_bytes(seed.checkpoint, step))  # FFN + attention experts
                outputs = bam_layer(step, plans, routers, draw, check)
            check_finite(outputs.items(), "the inputs", CORRUPT)
            for name, tensor in outputs.items():
                writer.add(name, tensor)
                written[name] = (tuple(tensor.shape), tensor.dtype)
            bar.update(count)
    if routers:
        raise ValueError(f"the BAM model has routers outside the converted blocks: {[n for n, _ in routers][:3]}")
    adapter = find_adapter(bam)
    record = new_record(adapter.name, adapter.describe(bam), dtype_name(bam), {}, merge=merge_recipe(cfg),
                        origin=seed.origin)  # fmt: skip
    check_written(record, written)
    write_record(staging, record)
    copy_tokenizer_files(seed.source_dir, staging)


def backbone_or_attention(name: str, plans: list[Plan], cfg: MergeConfig) -> dict[str, torch.Tensor]:
    """A tensor outside the FFNs: an attention projection's becomes the stack of attention experts
    ``<layer><attention>.w_<q|k|v|o>`` (``b_`` for a bias; the inputs' mean, kept as one expert, for shared K, V);
    any other is the inputs' average under its own name."""
    adapter = plans[0].adapter
    attention = adapter.block_modules["attention"]
    for part, projection in zip("qkvo", adapter.attention_projections, strict=True):
        for kind, letter in (("weight", "w"), ("bias", "b")):
            suffix = f".{attention}.{projection}.{kind}"
            if name.endswith(suffix):
                stacked = torch.stack([plan.checkpoint.read([name])[name] for plan in plans])  # [e, out(, in)]
                if cfg.shared_kv and part in "kv":
                    stacked = stacked.float().mean(0, keepdim=True).to(stacked.dtype)  # [1, out(, in)]
                return {f"{name.removesuffix(suffix)}.{attention}.{letter}_{part}": stacked}
    return {name: average([plan.checkpoint.read([name]) for plan in plans], name)}


def bam_layer(site: FFNSite, plans: list[Plan], routers: list, draw, check: EquivalenceCheck | None) -> dict:
    """Block ``site``'s FFN experts (expert j = input j's FFN), checked, and the block's routers, drawn in module
    order (``routers``: those not drawn yet, in module order; this block's are taken off the front)."""
    ffns = [read_dense_ffn(plan.checkpoint, site, plan.activation, plan.layout) for plan in plans]
    experts = stack_experts(ffns)
    if check is not None:
        e = experts.num_experts

        def each_expert(x: torch.Tensor) -> torch.Tensor:  # [t, d] -> [e, t, d]
            return experts.forward_stacked(x.expand(e, *x.shape))

        check.compare(site.name, check.probe_mixture(ffns), each_expert, each_expert)
    outputs = {f"{site.name}.experts.{name}": tensor for name, tensor in experts.state_dict().items()}
    block = site.name.removesuffix(plans[0].layout.ffn)  # "model.layers.{i}."
    while routers and routers[0][0].startswith(block):
        name, like = routers.pop(0)
        outputs[f"{name}.gate.weight"] = draw(like)
    return outputs
