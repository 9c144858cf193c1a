"""Multiply-accumulates (MACs) one forward pass costs, with MoE layers charged for what their routing executed.

Convention: one MAC per multiply-add of a matrix product. A Linear ``y = x Wᵀ`` costs ``in·out`` MACs per token,
attention costs ``QKᵀ`` + ``AV`` (``2·n²·d_head`` per head and example, causal or not: the kernels compute the
full product), a convolution ``k_h·k_w·c_in/groups·c_out`` per output position. Bias adds, norms, activations,
softmax and other elementwise ops count zero, everywhere, so dense and MoE models are compared alike.

How: the forward runs under :class:`torch.utils.flop_counter.FlopCounterMode` (FLOPs = 2·MACs for every op it
knows: ``mm``, ``addmm``, ``bmm``, ``baddbmm``, convolutions, the CUDA fused attentions). It does not know the CPU
fused attention ``aten._scaled_dot_product_flash_attention_for_cpu`` (what ``F.scaled_dot_product_attention``
dispatches to on CPU, used by timm and transformers' "sdpa"), so that op is mapped here to the same formula.
Forward hooks read the counter as each watched module starts and ends, which attributes FLOPs to modules.

MoE layers are not taken from the counter: the grouped backend runs padded ``[e, c, d]`` buffers (c = the busiest
expert's load), so what it multiplies is not what the routing asked for. For each MoE layer the counter's figure is
dropped and replaced by

* experts: executed (token, expert) pairs × per-pair cost, per pair ``3·d·h`` (gated) or ``2·d·h`` (plain).
  Sparse routing counts only pairs whose ``mask`` is on (capacity drops, dynamic-k); slot routing (Soft MoE) runs
  each expert on its ``s`` slots per example, ``b·S`` "pairs". Dual-path experts (SpheroMoE) charge each group at
  its own width: ``b·s·(e_c·cost(h) + e_u·cost(h_u))``. The hidden LayerNorm (EVA-02) is elementwise: zero.
* routers: what the counter measured inside the router (the top-k gate is ``d·e`` per token, the D2DMoE /
  MoEfication router MLP ``d·r + r·e`` with r its hidden width; Soft MoE and SpheroMoE logits are ``n·S·d`` per
  example, SpheroMoE's optional key projection ``d²`` per token), plus for slot routing the dispatch ``S·n·d`` and
  combine ``n·S·d`` mixes per example, which the experts module runs.
* shared experts: what the counter measured inside the shared expert and its gate (dense, every token).

The result is independent of the backend (eager, grouped, a GPU kernel).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..adapters import adapter_of
from ..layers import FFN, DualPathExperts, Experts, MoE, moe_layers
from ..layers.routing import Routing
from ..record import record_of
from ._common import (
    Forward,
    batch_size,
    default_forward,
    evaluating,
    model_device,
    model_inputs,
    resolve_forward,
    to_device,
)

CATEGORIES = ("experts", "routers", "shared_experts", "attention", "ffn", "other")
HEAD = re.compile(r"(?<!multi)head")  # a head module's class name; the "head" of "multihead" attention is not one


@dataclass
class MacReport:
    """MACs of one forward, per sample (``per_sample``) or for the whole batch.

    ``breakdown`` sums to ``total``: experts / routers / shared_experts of MoE layers, attention modules (their
    projections and score products), dense FFN modules, and everything else (embeddings, patch stem, heads, ...).
    ``per_module``: MACs of each attention / FFN / MoE module. ``moe``: per MoE layer, ``tokens``, executed
    ``pairs``, its ``experts`` / ``routers`` / ``shared_experts`` MACs and ``measured`` (what FlopCounterMode saw
    inside it; above the routed count where the backend pads). ``dense_equivalent``: the same model with each MoE
    layer replaced by the dense FFN it was made from (None when that FFN is not known).
    """

    total: float
    breakdown: dict[str, float]
    dense_equivalent: float | None = None
    per_module: dict[str, float] = field(default_factory=dict)
    moe: dict[str, dict[str, float]] = field(default_factory=dict)
    batch_size: int = 1
    per_sample: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


# ---- the counter -------------------------------------------------------------------------------------------------
def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``softmax(Q Kᵀ) V`` from shapes ``[b, h, n_q, d]``; key/value may have fewer (GQA) heads."""
    batch_heads, n_q, d_qk = math.prod(query_shape[:-2]), query_shape[-2], query_shape[-1]
    n_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * batch_heads * n_q * n_k * (d_qk + d_v)


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode that also counts the CPU fused attention kernel."""
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}
    return FlopCounterMode(display=False, custom_mapping=mapping)


class _Meter:
    """Forward hooks recording the FLOPs the counter saw while each watched module ran (summed over calls)."""

    def __init__(self, counter: FlopCounterMode):
        self.counter = counter
        self.flops: dict[str, int] = defaultdict(int)
        self._entry: dict[str, list[int]] = defaultdict(list)  # a stack per module: it may run re-entrantly
        self._handles: list = []

    def watch(self, name: str, module: nn.Module) -> None:
        self._handles.append(module.register_forward_pre_hook(partial(self._enter, name)))
        self._handles.append(module.register_forward_hook(partial(self._exit, name)))

    def _enter(self, name: str, *_) -> None:
        self._entry[name].append(self.counter.get_total_flops())

    def _exit(self, name: str, *_) -> None:
        self.flops[name] += self.counter.get_total_flops() - self._entry[name].pop()

    def macs(self, name: str) -> float:
        return self.flops.get(name, 0) / 2  # every counted op is a product: 2 FLOPs per MAC

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


# ---- MoE layers, analytically --------------------------------------------------------------------------------------
def pair_macs(experts: Experts) -> int:
    """MACs of one expert on one token (or slot): up (+ gate) projection d·h each, down projection h·d."""
    return (3 if experts.gated else 2) * experts.d_model * experts.d_hidden


def expert_macs(experts: Experts | DualPathExperts, routing: Routing) -> int:
    """MACs the experts spend on one call: executed pairs × per-pair cost; dual-path groups at their own widths
    (every expert of a slot router gets ``b·s`` slots)."""
    if isinstance(experts, DualPathExperts):
        slots_per_expert = routing.dispatch.shape[0] * routing.slots_per_expert  # b·s
        return slots_per_expert * sum(group.num_experts * pair_macs(group) for group in experts.groups())
    return routed_work(routing, experts.d_model)[0] * pair_macs(experts)


def routed_work(routing: Routing, d_model: int) -> tuple[int, int]:
    """(executed pairs, slot-mixing MACs) of one call. Sparse: pairs whose mask is on, no mixing. Slots: every
    slot of every example is one pair; dispatch ``[b, n, S]`` and combine each cost ``b·n·S·d``."""
    if routing.is_sparse:
        return int(routing.executed().sum()), 0
    b, n, slots = routing.dispatch.shape
    return b * slots, 2 * b * n * slots * d_model


class _MoETally:
    """Per MoE layer: tokens, executed pairs, expert and slot-mixing MACs summed over the calls of one forward."""

    def __init__(self) -> None:
        self.tokens: dict[str, int] = defaultdict(int)
        self.pairs: dict[str, int] = defaultdict(int)
        self.experts: dict[str, int] = defaultdict(int)
        self.mixing: dict[str, int] = defaultdict(int)
        self._handles: list = []

    def watch(self, name: str, moe: MoE) -> None:
        self._handles.append(moe.register_forward_hook(partial(self._record, name), with_kwargs=True))

    def _record(self, name: str, moe: MoE, args: tuple, kwargs: dict, output) -> None:
        if moe.last_routing is None:
            raise RuntimeError(f"MoE layer {name} ran without storing last_routing; cannot count its experts")
        pairs, mixing = routed_work(moe.last_routing, moe.d_model)
        x = args[0] if args else kwargs["x"]
        self.tokens[name] += x.numel() // moe.d_model
        self.pairs[name] += pairs
        self.experts[name] += expert_macs(moe.experts, moe.last_routing)
        self.mixing[name] += mixing

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


# ---- attributing the rest to attention / FFN / other -------------------------------------------------------------
def _is_descendant(name: str, ancestor: str) -> bool:
    return name != ancestor and (ancestor == "" or name.startswith(ancestor + "."))


def _category(name: str, module: nn.Module, ffn_sites: set[str]) -> str | None:
    """ "attention", "ffn" or None, by the adapter's FFN sites, the FFN class, then the class name (timm
    ``Attention``/``Mlp``, HF ``LlamaAttention``/``LlamaMLP``, ...). The root is never classified (a model class
    named like ``MlpMixer`` is not one FFN), nor are heads (timm's ``NormMlpClassifierHead``); the "head" of a
    multi-head attention (``MultiHeadSelfAttention``, torch's ``MultiheadAttention``) does not make it one."""
    if name == "":
        return None
    if name in ffn_sites or isinstance(module, FFN):
        return "ffn"
    cls = type(module).__name__.lower()
    if HEAD.search(cls):
        return None
    if "attention" in cls or cls.endswith("attn"):
        return "attention"
    if "mlp" in cls or "feedforward" in cls or cls == "ffn":
        return "ffn"
    return None


def _regions(model: nn.Module, moe_names: list[str], ffn_sites: set[str]) -> list[tuple[str, nn.Module, str]]:
    """Outermost attention / FFN modules outside MoE layers, as (name, module, category)."""
    regions: list[tuple[str, nn.Module, str]] = []
    for name, module in model.named_modules():
        if name in moe_names or any(_is_descendant(name, outer) for outer in [*moe_names, *(r[0] for r in regions)]):
            continue
        category = _category(name, module, ffn_sites)
        if category == "ffn" and any(_is_descendant(moe, name) for moe in moe_names):
            continue  # the wrapper an adapter installed around an MoE (MoEFFN): its content is the MoE
        if category is not None:
            regions.append((name, module, category))
    return regions


def _ffn_sites(model: nn.Module) -> set[str]:
    """Every module the adapter says computes part of a dense FFN (a split FFN spans several)."""
    try:
        return adapter_of(model).ffn_modules(model)  # a converted model: the adapter on its record
    except ValueError:  # no adapter for this model (or an FFN it refuses): fall back on class names
        return set()


def _default_forward_for(model: nn.Module) -> Forward:
    try:
        return adapter_of(model).outputs
    except ValueError:
        return default_forward


# ---- dense equivalent ------------------------------------------------------------------------------------------------
def dense_hidden(model: nn.Module, moe: MoE) -> int | None:
    """Hidden width of the dense FFN an MoE layer was made from, when its provenance says: a neuron split keeps
    the dense units of each expert (``hidden_units [e, h/e]``); sparse upcycling makes copies of G shards."""
    units = getattr(moe, "hidden_units", None)
    if isinstance(units, torch.Tensor):
        return units.numel()
    record = record_of(model)
    if record is not None and record.merge:  # BTX / BAM: each expert is a whole dense FFN (of one branch)
        return moe.experts.d_hidden
    recipe = (record.convert if record is not None else None) or {}
    if recipe.get("method") == "sparse_upcycling":
        return moe.experts.d_hidden * int((recipe.get("options") or {}).get("granularity", 1))
    return None


def _dense_ffn_macs(model: nn.Module, moe: MoE, tokens: int) -> float | None:
    hidden = dense_hidden(model, moe)
    if hidden is None:
        return None
    experts = moe.experts.core if isinstance(moe.experts, DualPathExperts) else moe.experts  # the dense FFN's kind
    return tokens * (3 if experts.gated else 2) * moe.d_model * hidden


def _outer_moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    moes = moe_layers(model)
    return [(name, moe) for name, moe in moes if not any(_is_descendant(name, other) for other, _ in moes)]


def _instrument(counter: FlopCounterMode, moes, regions) -> tuple[_Meter, _MoETally]:
    """Meters on every region, every MoE layer and its router / shared parts; the routing tally on every MoE."""
    meter, tally = _Meter(counter), _MoETally()
    for name, module, _ in regions:
        meter.watch(name, module)
    for name, moe in moes:
        meter.watch(name, moe)
        meter.watch(f"{name}.router", moe.router)
        for part in ("shared_expert", "shared_expert_gate"):
            if getattr(moe, part) is not None:
                meter.watch(f"{name}.{part}", getattr(moe, part))
        tally.watch(name, moe)
    return meter, tally


def _moe_layer_report(name: str, meter: _Meter, tally: _MoETally) -> dict[str, float]:
    return {
        "tokens": tally.tokens[name],
        "pairs": tally.pairs[name],
        "experts": tally.experts[name],
        "routers": meter.macs(f"{name}.router") + tally.mixing[name],
        "shared_experts": meter.macs(f"{name}.shared_expert") + meter.macs(f"{name}.shared_expert_gate"),
        "measured": meter.macs(name),
    }


def _attribute(measured_total: float, moe_report: dict, regions, meter: _Meter) -> tuple[dict, dict]:
    """(breakdown by category, MACs per module): MoE layers by their routed count, regions by what was measured
    inside them less any MoE layer they hold, and "other" = the measured rest."""
    breakdown = dict.fromkeys(CATEGORIES, 0.0)
    per_module: dict[str, float] = {}
    for name, layer in moe_report.items():
        per_module[name] = layer["experts"] + layer["routers"] + layer["shared_experts"]
        for key in ("experts", "routers", "shared_experts"):
            breakdown[key] += layer[key]
    for name, _, category in regions:
        inner_moe = sum(layer["measured"] for moe, layer in moe_report.items() if _is_descendant(moe, name))
        per_module[name] = meter.macs(name) - inner_moe
        breakdown[category] += per_module[name]
    outside = sum(per_module[name] for name, _, _ in regions) + sum(layer["measured"] for layer in moe_report.values())
    breakdown["other"] = measured_total - outside
    return breakdown, per_module


# ---- the public functions --------------------------------------------------------------------------------------------
def count_macs(
    model: nn.Module,
    inputs: dict,
    per_sample: bool = True,
    *,
    forward: Forward | None = None,
    dense_model: nn.Module | None = None,
) -> MacReport:
    """MACs of ``forward(model, inputs)`` (default: the model's adapter, else ``model(x)`` / ``model(**inputs)``),
    in eval mode without grad (the previous modes are restored). ``per_sample`` divides by the batch size (the
    leading dim of the first input tensor: per image, or per sequence of T tokens). ``dense_model``: count it on
    the same inputs for ``dense_equivalent`` instead of inferring the dense FFNs from the MoE layers' provenance."""
    run = resolve_forward(forward) if forward is not None else _default_forward_for(model)
    inputs = to_device(model_inputs(inputs), model_device(model))  # a batch's labels are not a model input
    moes = _outer_moe_layers(model)
    regions = _regions(model, [name for name, _ in moes], _ffn_sites(model))

    counter = flop_counter()
    meter, tally = _instrument(counter, moes, regions)
    try:
        with evaluating(model), counter:
            run(model, inputs)
    finally:
        meter.remove()
        tally.remove()

    moe_report = {name: _moe_layer_report(name, meter, tally) for name, _ in moes}
    breakdown, per_module = _attribute(counter.get_total_flops() / 2, moe_report, regions, meter)
    total = sum(breakdown.values())
    dense_equivalent = _dense_equivalent(model, moes, moe_report, total)
    if dense_model is not None:
        dense_equivalent = count_macs(dense_model, inputs, per_sample=False, forward=forward).total

    scale = 1.0 / batch_size(inputs) if per_sample else 1.0
    return MacReport(
        total=total * scale,
        breakdown={key: value * scale for key, value in breakdown.items()},
        dense_equivalent=None if dense_equivalent is None else dense_equivalent * scale,
        per_module={key: value * scale for key, value in per_module.items()},
        moe={name: {key: value * scale for key, value in layer.items()} for name, layer in moe_report.items()},
        batch_size=batch_size(inputs),
        per_sample=per_sample,
    )


def _dense_equivalent(model, moes, moe_report, total) -> float | None:
    """``total`` with each MoE layer's routed experts and router swapped for its dense FFN (shared experts kept)."""
    dense = total
    for name, moe in moes:
        layer = moe_report[name]
        ffn = _dense_ffn_macs(model, moe, layer["tokens"])
        if ffn is None:
            return None
        dense += ffn - layer["experts"] - layer["routers"]
    return dense


def flops_fraction(
    moe_model: nn.Module, dense_model: nn.Module, inputs: dict, *, forward: Forward | None = None
) -> float:
    """MoE MACs / dense MACs on the same inputs, routers included (1.0: the MoE costs what the dense model does)."""
    moe_macs = count_macs(moe_model, inputs, forward=forward).total
    dense_macs = count_macs(dense_model, inputs, forward=forward).total
    return moe_macs / dense_macs
