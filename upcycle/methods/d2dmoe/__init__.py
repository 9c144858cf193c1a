"""D2DMoE (Szatkowski et al., arXiv 2310.04361) and MoEfication (arXiv 2110.01786): the stages around the split.

    teacher = copy.deepcopy(vit)
    replace_attention_projections(vit)                      # Q, K, V, O -> equal-cost ReLU MLPs (§3.4)
    report = distill_attention_projections(vit, teacher, "fashion_mnist", steps=500)
    moe = upcycle.convert(vit, "neuron_split", num_experts=8, layers="all")   # projections become MoE layers too

The MLPs then go through the FFN stages (activation sparsity, expert split, router training) like any FFN.
The whole pipeline, stage by stage and resumable (:mod:`.pipeline`; CLI ``upcycle d2dmoe``)::

    summary = run_d2dmoe(vit, {"data": "fashion_mnist", "num_experts": 16, "attention": {}}, "runs/d2d")

    split.py                 neuron partition (balanced k-means on W1 rows, random) as the method ``neuron_split``
    recycling.py             the methods ``d2dmoe`` (dynamic-k) and ``moefication`` (fixed top-k): split + router
    dynamic_k_router.py      D2DMoE's router (predicted expert norms, threshold τ); moefication_router.py MoEfication's
    relu.py, distill.py      the ReLU + sparsity stage, the attention-projection distillation (§3.4)
    recipe.py, pipeline.py   the resumable stages; sweep.py the τ / k sweeps; plots.py; bench.py; recipes/
    choices.py               paper / released code / ours, point by point (``--preset paper`` / ``released``)
"""

from importlib import import_module

import torch
from torch import nn

from ...adapters import find_adapter
from . import choices  # noqa: F401  (registers the paper / released presets)

# the stages train and evaluate: they load on first use, so registering the split methods and routers stays light
_LAZY = {"run_d2dmoe": "pipeline", "run_stages": "pipeline", "sweep_methods": "pipeline", "D2DMoERecipe": "recipe",
         "load_recipe": "recipe", "activation_sparsity": "relu", "swap_to_relu": "relu",
         "distill_attention_projections": "distill"}  # fmt: skip


def replace_attention_projections(model: nn.Module, hidden_ratio: float = 0.5,
                                  generator: torch.Generator | None = None) -> nn.Module:  # fmt: skip
    """§3.4: every attention projection (Q, K, V, O) becomes an equal-cost ReLU MLP, in place, where the model's
    adapter supports it (timm ViTs); the MLPs then go through the FFN stages. Returns ``model``."""
    return find_adapter(model).replace_attention_projections(model, hidden_ratio, generator)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "D2DMoERecipe",
    "activation_sparsity",
    "distill_attention_projections",
    "load_recipe",
    "replace_attention_projections",
    "run_d2dmoe",
    "run_stages",
    "swap_to_relu",
    "sweep_methods",
]
