"""MoE Jetpack checkpoint recycling: which dense hidden units (and model channels) each expert inherits
(Zhu et al., arXiv 2406.04801, §3.1 "Checkpoint Recycling"; released code ``moejet/tools/gen_ViT_MoE_weight.py``).

Every strategy returns per-expert index sets ``[e, h]`` (LongTensor on the CPU, sorted ascending within each expert)
and draws every random choice from the ``torch.Generator`` it is given. Save the sets with the model: a seed alone
does not reproduce them across devices or library versions. Experts must differ, since a recycled MoE whose
experts are copies of one another starts with nothing to route between; a draw that repeats an earlier expert is
redrawn, and a request that cannot give distinct experts is refused up front with the reason.
  - ``importance_sampling`` (paper default): h units drawn without replacement ∝ activation magnitude, per expert;
  - ``graph_partition_sampling``: METIS parts of the co-activation graph, each expert a union of random parts;
  - ``uniform_selection``: evenly spaced units, shifted per expert (the released code makes all experts equal);
  - ``random_sampling``: independent uniform subsets.
``channel_selection`` picks the model channels kept when experts are narrower than their source (d < d_src, e.g.
ViT-T experts from ViT-S FFNs) and ``slice_expert_weights`` cuts the stacked expert tensors out of the dense FFN.
Dimension letters: e experts, H source hidden units, h expert hidden units, d_src source channels, d expert channels.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

from ..._optional import require
from ...adapters.dense_ffn import DenseFFN


def importance_sampling(importance: torch.Tensor, num_experts: int, h: int, generator: torch.Generator,
                        max_attempts: int = 1000) -> torch.Tensor:  # fmt: skip
    """Per expert, h of the H units drawn without replacement with probability ∝ ``importance [H]`` -> ``[e, h]``.

    Important units land in many experts, yet experts differ (paper §3.1). Units of zero importance are never
    drawn while at least h units have positive importance; with fewer, every expert holds all positive units and
    fills the rest uniformly from the others (the limit of drawing ∝ importance).
    """
    weights = _weights(importance, "importance")
    total = weights.numel()
    _check_sizes(total, num_experts, h, "hidden units")
    positive, zero = torch.nonzero(weights > 0).squeeze(1), torch.nonzero(weights == 0).squeeze(1)
    if positive.numel() >= h:
        possible = math.comb(positive.numel(), h)
    else:
        possible = math.comb(zero.numel(), h - positive.numel())
    _require_distinct(possible, num_experts, f"{h} of {total} units with {positive.numel()} of positive importance")
    return _distinct_draws(lambda: _draw_proportional(weights, h, generator), num_experts, max_attempts,
                           "the importance is concentrated on too few units")  # fmt: skip


def channel_selection(importance: torch.Tensor, d: int, num_experts: int, mode: str = "shared",
                      generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """The d of ``importance [d_src]``'s channels each expert keeps -> ``[e, d]``.

    ``shared``: one top-d set by importance for every expert (paper text; pass the mean importance over layers to
    choose by it). ``sampled``: drawn per expert ∝ importance like hidden units (released code); experts may repeat
    a set, since their hidden units already differ. The identity ``arange(d)`` when d == d_src.
    """
    weights = _weights(importance, "channel importance")
    d_src = weights.numel()
    _check_sizes(d_src, num_experts, d, "channels")
    if mode not in ("shared", "sampled"):
        raise ValueError(f"channel selection mode must be 'shared' or 'sampled', got {mode!r}")
    if d == d_src:
        return torch.arange(d).expand(num_experts, d).clone()
    if mode == "shared":
        return weights.topk(d).indices.sort().values.expand(num_experts, d).clone()
    if generator is None:
        raise ValueError("channel selection mode 'sampled' draws at random: pass a torch.Generator")
    return torch.stack([_draw_proportional(weights, d, generator).sort().values for _ in range(num_experts)])


def graph_partition_sampling(coactivation: torch.Tensor, num_experts: int, h: int, generator: torch.Generator,
                             parts: int = 32, threshold: float = 0.0, weighted: bool = False,
                             max_attempts: int = 1000) -> torch.Tensor:  # fmt: skip
    """Experts as unions of METIS parts of the co-activation graph ``coactivation [H, H]`` -> ``[e, h]``.

    Units u ≠ v share an edge when they were active together on more than ``threshold`` tokens (unweighted like the
    released code; ``weighted`` passes the counts, rescaled to integers 1..1000, as METIS edge weights). METIS cuts
    the graph into ``parts`` balanced parts of units that fire together; each expert visits the parts in a random
    order and takes whole parts until h units, the part that would overshoot contributing a random subset. (The
    released code draws 17 of 32 parts ∝ their internal co-activation and truncates; we keep experts at exactly
    h units.) A graph without edges has no structure to keep: its parts are a random balanced partition.
    """
    counts = coactivation.detach().to("cpu", torch.float64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"coactivation must be a square [H, H] matrix, got shape {tuple(counts.shape)}")
    total = counts.shape[0]
    _check_sizes(total, num_experts, h, "hidden units")
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    _require_distinct(math.comb(total, h), num_experts, f"{h} of {total} units")
    groups = _metis_parts(counts, min(parts, total), threshold, weighted, generator)

    def draw() -> torch.Tensor:
        chosen, room = [], h
        for part in torch.randperm(len(groups), generator=generator).tolist():
            units = groups[part]
            if units.numel() > room:  # the last part overshoots: a random subset of it fills the expert exactly
                units = units[torch.randperm(units.numel(), generator=generator)[:room]]
            chosen.append(units)
            room -= units.numel()
            if room == 0:
                break
        return torch.cat(chosen)

    return _distinct_draws(draw, num_experts, max_attempts, "the partition leaves too few distinct unions of parts")


def uniform_selection(total: int, num_experts: int, h: int) -> torch.Tensor:
    """Evenly spaced units, expert i shifted by i/e of the spacing -> ``[e, h]``: unit j of expert i is
    ⌊(j + i/e)·H/h⌋, computed in integers, so experts differ by their offset (the released code gives every expert
    the same set). Only about H/h distinct offsets exist: with more experts than that, consecutive experts share an
    offset (a warning says how many distinct sets there are) — evenly spaced sets cannot differ more; a single set
    for several experts is refused."""
    _check_sizes(total, num_experts, h, "hidden units")
    j, i = torch.arange(h), torch.arange(num_experts)
    index = ((j.unsqueeze(0) * num_experts + i.unsqueeze(1)) * total) // (h * num_experts)  # [e, h]
    distinct = len({tuple(row) for row in index.tolist()})
    if distinct == 1:  # every expert the same set: what the released code does, and what we refuse
        _require_distinct(1, num_experts, f"evenly spaced sets of {h} of {total} units")
    if distinct < num_experts:
        warnings.warn(
            f"uniform selection: evenly spaced sets of {h} of {total} units (spacing {total / h:.2f}) have only "
            f"{distinct} distinct offsets for {num_experts} experts, so experts share sets",
            stacklevel=2,
        )
    return index


def random_sampling(total: int, num_experts: int, h: int, generator: torch.Generator,
                    max_attempts: int = 1000) -> torch.Tensor:  # fmt: skip
    """Independent uniform random subsets of h of the H units -> ``[e, h]``."""
    _check_sizes(total, num_experts, h, "hidden units")
    _require_distinct(math.comb(total, h), num_experts, f"{h} of {total} units")
    return _distinct_draws(lambda: torch.randperm(total, generator=generator)[:h], num_experts, max_attempts,
                           "too few distinct subsets")  # fmt: skip


@torch.no_grad()
def slice_expert_weights(dense: DenseFFN, hidden_index: torch.Tensor,
                         channel_index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Stacked expert tensors cut out of ``dense``, named like :class:`upcycle.layers.Experts`' parameters.

    ``hidden_index [e, h]``: rows of W_up/W_gate/b_up/b_gate/hidden norm and columns of W_down per expert.
    ``channel_index [e, d]`` (or None: all d_src channels): the model channels kept, i.e. the columns of
    W_up/W_gate, the rows of W_down and the entries of b_down (recycling from a wider predecessor). b_down is not
    divided among experts: each keeps the whole (channel-restricted) dense bias, because a slot combine sums to 1
    per token. Returns w_up [e, h, d], w_down [e, d, h], and when the dense FFN has them b_up [e, h],
    w_gate [e, h, d], b_gate [e, h], b_down [e, d], norm_weight / norm_bias [e, h].
    """
    device = dense.w_up.device
    hidden_index = _check_index(hidden_index, dense.d_hidden, "hidden_index", "hidden units").to(device)
    e = hidden_index.shape[0]
    if channel_index is not None:
        channel_index = _check_index(channel_index, dense.d_model, "channel_index", "channels").to(device)
        if channel_index.shape[0] != e:
            raise ValueError(f"channel_index has {channel_index.shape[0]} experts, hidden_index has {e}")

    def rows(weight: torch.Tensor) -> torch.Tensor:  # [H, d_src] -> [e, h, d]
        picked = weight[hidden_index]  # [e, h, d_src]
        if channel_index is None:
            return picked
        return picked.gather(2, channel_index.unsqueeze(1).expand(-1, picked.shape[1], -1))

    sliced = {"w_up": rows(dense.w_up), "w_down": rows(dense.w_down.T).transpose(1, 2)}  # w_down: [e, d, h]
    if dense.w_gate is not None:
        sliced["w_gate"] = rows(dense.w_gate)
    for name, bias in (("b_up", dense.b_up), ("b_gate", dense.b_gate)):
        if bias is not None:
            sliced[name] = bias[hidden_index]
    if dense.b_down is not None:
        sliced["b_down"] = dense.b_down.expand(e, -1) if channel_index is None else dense.b_down[channel_index]
    if dense.hidden_norm is not None:
        sliced["norm_weight"], sliced["norm_bias"] = (t[hidden_index] for t in dense.hidden_norm[:2])
    return {name: tensor.contiguous() for name, tensor in sliced.items()}


def _weights(importance: torch.Tensor, what: str) -> torch.Tensor:
    weights = importance.detach().to("cpu", torch.float64)
    if weights.ndim != 1:
        raise ValueError(f"{what} must be a vector [H], got shape {tuple(weights.shape)}")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError(f"{what} must be finite and non-negative")
    return weights


def _check_sizes(total: int, num_experts: int, size: int, what: str) -> None:
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if not 1 <= size <= total:
        raise ValueError(f"cannot take {size} {what} per expert out of {total}; choose 1 <= size <= {total}")


def _require_distinct(possible: int, num_experts: int, detail: str) -> None:
    if possible < num_experts:
        raise ValueError(
            f"{num_experts} experts cannot differ: {detail} allow only {possible} distinct set(s); "
            "use fewer experts or a smaller expert hidden size"
        )


def _draw_proportional(weights: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """``size`` distinct indices drawn ∝ ``weights`` without replacement (all positive ones first)."""
    positive = torch.nonzero(weights > 0).squeeze(1)
    if positive.numel() >= size:
        return positive[torch.multinomial(weights[positive], size, replacement=False, generator=generator)]
    zero = torch.nonzero(weights == 0).squeeze(1)
    fill = zero[torch.randperm(zero.numel(), generator=generator)[: size - positive.numel()]]
    return torch.cat([positive, fill])


def _distinct_draws(draw: Callable[[], torch.Tensor], num_experts: int, max_attempts: int, why: str) -> torch.Tensor:
    """Stack ``num_experts`` sorted draws, redrawing any that repeats an earlier expert -> ``[e, h]``."""
    experts, seen = [], set()
    for expert in range(num_experts):
        for _ in range(max_attempts):
            units = draw().sort().values
            key = tuple(units.tolist())
            if key not in seen:
                break
        else:
            raise ValueError(
                f"expert {expert} repeated an earlier expert in {max_attempts} draws ({why}); use fewer experts"
            )
        seen.add(key)
        experts.append(units)
    return torch.stack(experts)


def _metis_parts(counts: torch.Tensor, parts: int, threshold: float, weighted: bool,
                 generator: torch.Generator) -> list[torch.Tensor]:  # fmt: skip
    """Hidden units of each non-empty METIS part of the thresholded co-activation graph."""
    total = counts.shape[0]
    counts = torch.maximum(counts, counts.T)  # METIS needs a symmetric graph; A^T A already is one
    counts.fill_diagonal_(0)  # the diagonal counts a unit's own activity: no edge
    adjacency = counts > threshold
    if parts == 1 or not adjacency.any():
        return list(torch.randperm(total, generator=generator).tensor_split(parts))
    pymetis = require("pymetis", extra="metis", purpose="graph-partition sampling (METIS)")
    rows, cols = adjacency.nonzero(as_tuple=True)  # row-major order, i.e. CSR order
    starts = torch.zeros(total + 1, dtype=torch.long)
    starts[1:] = adjacency.sum(dim=1).cumsum(0)
    eweights = None
    if weighted:  # positive integers, bounded so METIS's 32-bit sums of weights cannot overflow
        weights = counts[rows, cols]
        eweights = (1 + (999 * weights / weights.max()).round()).long().tolist()
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))  # METIS's own randomness, from our generator
    _, membership = pymetis.part_graph(
        parts, adjacency=pymetis.CSRAdjacency(starts.tolist(), cols.tolist()), eweights=eweights,
        options=pymetis.Options(seed=seed),
    )  # fmt: skip
    membership = torch.tensor(list(membership))
    groups = [torch.nonzero(membership == part).squeeze(1) for part in range(parts)]
    return [group for group in groups if group.numel() > 0]


def _check_index(index: torch.Tensor, total: int, name: str, what: str) -> torch.Tensor:
    if not isinstance(index, torch.Tensor) or index.ndim != 2 or index.is_floating_point() or index.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor [e, n]")
    if index.shape[0] < 1 or not 1 <= index.shape[1] <= total:
        raise ValueError(
            f"{name} has shape {tuple(index.shape)}: need at least one expert and 1..{total} {what} (source size)"
        )
    if index.min() < 0 or index.max() >= total:
        raise ValueError(f"{name} holds indices outside 0..{total - 1}")
    if (index.sort(dim=1).values.diff(dim=1) == 0).any():
        raise ValueError(f"{name} repeats a unit within an expert")
    return index.long()
