"""Routers that start from data instead of noise: each expert's gate row points where the tokens it should take lie.

A new router usually starts as small random rows, so at step 0 it routes almost uniformly and by chance; the first
hundreds of steps then sort tokens out. Here the rows come from the hidden states the router will see:

* ``centroids`` (upcycling: the experts start alike): the inputs of each MoE layer on calibration text or images are
  clustered by direction (spherical k-means, one cluster per expert), and expert j's row is the direction of
  centroid j, so a token goes to the expert whose cluster it is closest to in angle;
* ``domain_means`` (merges, BTX / BAM: expert j was trained on domain j): expert j's row is the direction of the mean
  layer input over calibration data of domain j, as mergekit's ``hidden`` gate mode builds its MoE gates from
  per-expert prompts.

Rows are unit directions times one scale per layer, chosen so that the logits of the calibration tokens spread with
a standard deviation of ``logit_std`` across experts (1 by default: a router that prefers but is not yet certain).
A layer whose router rows are tied in groups (granular upcycling's virtual groups, shared + fine-grained segments)
keeps the tie: its tokens are clustered into one cluster per group, which keeps the conversion exact.

The inputs are recorded in one calibration pass through the converted model, with the routers as they were. For
a dense-equivalent conversion that is the dense model's hidden states; for a merge, layers after the first see
inputs routed by the random routers (their domain means move by < 1 % in angle in the tests), which saves one
pass per layer.

Only routers whose logits are one gate row per expert (``Router.linear_logits``: top-k, sigmoid) have rows to set;
other routers are refused by name. Dimension letters: t tokens, d model width, e experts, g experts per tied group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .adapters import find_adapter, get_adapter
from .eval.calibration import calibration_inputs, record_inputs
from .layers import moe_layers
from .record import record_of


def spherical_kmeans(x: torch.Tensor, clusters: int, generator: torch.Generator, iterations: int = 30) -> torch.Tensor:
    """Unit centroids ``[clusters, d]`` of the rows of ``x [t, d]`` by direction (cosine k-means), seeded by
    k-means++ on the unit sphere; an emptied cluster is re-seeded at the worst-served token."""
    points = torch.nn.functional.normalize(x.float(), dim=1)  # [t, d]
    if points.shape[0] < clusters:
        raise ValueError(f"{points.shape[0]} calibration tokens cannot seed {clusters} clusters; give more examples")
    first = torch.randint(points.shape[0], (1,), generator=generator)
    centroids = points[first]
    while centroids.shape[0] < clusters:  # k-means++: next seed far (in angle) from the chosen ones
        distance = (1 - points @ centroids.T).amin(dim=1).clamp_min(0)  # [t]
        weights = distance if distance.sum() > 0 else torch.ones_like(distance)
        centroids = torch.cat([centroids, points[torch.multinomial(weights, 1, generator=generator)]])
    for _ in range(iterations):
        similarity = points @ centroids.T  # [t, k]
        assignment = similarity.argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=clusters)
        for empty in (counts == 0).nonzero().flatten().tolist():
            worst = similarity.amax(dim=1).argmin()
            sums[empty], counts[empty] = points[worst], 1
        updated = torch.nn.functional.normalize(sums, dim=1)
        if torch.allclose(updated, centroids):
            break
        centroids = updated
    return centroids


def tied_group_size(gate: torch.Tensor) -> int:
    """g: the largest group size whose consecutive rows of ``gate [e, d]`` are all equal (1 when none are)."""
    experts = gate.shape[0]
    for size in range(experts, 1, -1):
        if experts % size == 0:
            groups = gate.view(experts // size, size, -1)
            if torch.equal(groups, groups[:, :1].expand_as(groups)):
                return size
    return 1


def set_rows(router: nn.Module, directions: torch.Tensor, x: torch.Tensor, logit_std: float) -> float:
    """router.gate.weight := ``directions [e, d]`` scaled so the logits of ``x [t, d]`` spread with ``logit_std``
    across experts; returns the scale."""
    spread = (x.float() @ directions.T).std(dim=1).mean()  # [t, e] -> mean per-token std across experts
    scale = logit_std / max(float(spread), 1e-12)
    with torch.no_grad():
        router.gate.weight.copy_(directions * scale)
    return scale


@torch.no_grad()
def init_routers_from_data(model: nn.Module, data: str | None = None,
                           domains: Sequence[str | Sequence[str]] | None = None, *, examples: int = 64,
                           seq_len: int = 128, max_tokens: int = 8192, logit_std: float = 1.0, seed: int = 0,
                           adapter=None, progress: bool = False) -> dict[str, dict]:  # fmt: skip
    """Set every MoE layer's router rows of a converted ``model`` from calibration data (training split), in place.

    ``data``: one dataset for all experts (``centroids``); ``domains``: one dataset per expert, in expert order, or a
    list of datasets pooled for an expert that knows them all (``domain_means``, for merges). Returns per layer what
    was done (mode, tie group, scale, tokens)."""
    if (data is None) == (domains is None):
        raise ValueError("give either data (one calibration set: cluster centroids) or domains (one set per expert)")
    if logit_std <= 0:
        raise ValueError(f"logit_std must be > 0, got {logit_std}")
    if adapter is None:
        record = record_of(model)  # a converted model: its family's adapter is on the record
        adapter = get_adapter(record.adapter) if record is not None and record.adapter else find_adapter(model)
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoE layer; convert it first")
    for name, layer in layers:
        if not layer.router.linear_logits:
            raise ValueError(
                f"{name}: its router ({type(layer.router).__name__}) has no linear gate whose rows could start "
                "from data; use router type topk or sigmoid"
            )
    generator = torch.Generator().manual_seed(seed)
    # an expert's domain may be several sets (a seed model that knows them all): its row is their pooled mean
    per_expert = None if domains is None else [[d] if isinstance(d, str) else list(d) for d in domains]
    sources = [data] if per_expert is None else sorted({name for names in per_expert for name in names})
    inputs = {source: _layer_inputs(model, adapter, layers, source, examples, seq_len, max_tokens)
              for source in sources}  # fmt: skip
    report = {}
    for name, layer in layers:
        gate = layer.router.gate.weight  # [e, d]
        experts = gate.shape[0]
        if per_expert is not None:
            if len(per_expert) != experts:
                raise ValueError(f"{name}: {len(per_expert)} domains for {experts} experts; give one per expert")
            means = torch.stack([torch.cat([inputs[s][name] for s in names]).mean(dim=0) for names in per_expert])
            directions = torch.nn.functional.normalize(means, dim=1)  # [e, d]
            group, pooled = 1, torch.cat([rows[name] for rows in inputs.values()])
        else:
            group, pooled = tied_group_size(gate), inputs[data][name]
            centroids = spherical_kmeans(pooled, experts // group, generator)  # [e / g, d]
            directions = centroids.repeat_interleave(group, dim=0)  # [e, d]: a tied group shares its row
        scale = set_rows(layer.router, directions.to(gate.dtype), pooled.to(gate.dtype), logit_std)
        report[name] = {"mode": "domain_means" if domains is not None else "centroids", "tied_group": group,
                        "scale": round(scale, 6), "tokens": int(pooled.shape[0])}  # fmt: skip
    return report


def _layer_inputs(model, adapter, layers, data: str, examples: int, seq_len: int, max_tokens: int):
    """{MoE layer name: [t, d] its inputs on ``data``}: recorded at the MoE modules, whatever wraps them."""
    inputs = calibration_inputs(model, adapter, data, examples, seq_len)
    return record_inputs(model, dict(layers), inputs, max_tokens=max_tokens)
