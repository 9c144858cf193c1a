"""The D2DMoE / MoEfication recipe: every stage's settings in one validated YAML (docs/methods/d2dmoe.md).

    d2dmoe:
      data: fashion_mnist
      num_experts: 16
      attention: {steps: 300}          # ViT only: Q/K/V/O -> ReLU MLPs first (omit to keep the projections)
      sparsify: {epochs: 1, lr: 1e-4, aux: {sparsity: 0.05}}
      routers: {epochs: 1, lr: 1e-3}
      methods: [d2dmoe, moefication]
      taus: [0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1]

``sparsify`` and ``routers`` are training recipes (:class:`~upcycle.config.TrainConfig` fields; ``data`` and
``seed`` come from here). The router stage always freezes everything but the routers and trains on the router-fit
loss alone; the sparsity stage always adds the activation penalty (squared Hoyer unless ``aux.sparsity_kind: l1``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from ...config import StrictModel, load_recipe_section, load_train_config, stage_defaults

SPARSIFY_DEFAULTS = {"epochs": 1, "lr": 1e-4, "warmup": 0.05,
                     "aux": {"sparsity": 0.05, "sparsity_kind": "hoyer", "sparsity_ramp": 0.5}}  # fmt: skip
ROUTER_DEFAULTS = {"epochs": 1, "lr": 1e-3, "weight_decay": 0.0, "augment": False}
# most of the cost falls between τ = 0 and 0.05 (the authors sweep 1 − τ up to 0.9999), so the grid is dense there
TAUS = [0.0, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0]
# the router stage fits the routers alone; the sparsity stage has no router
NO_ROUTER_LOSSES = {"load_balancing": 0.0, "z_loss": 0.0}


class AttentionStage(StrictModel):
    steps: int = Field(300, ge=1, description="distillation steps of the projection MLPs")
    batch_size: int = Field(32, ge=1, description="images per distillation step")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the projection MLPs")
    sparsity: float = Field(0.01, ge=0, description="normalised Hoyer penalty on the MLPs' hidden units")
    hidden_ratio: float = Field(0.5, gt=0, description="MLP width as a share of the equal-cost width (0.5: d/2)")


class D2DMoERecipe(StrictModel):
    data: str = Field(..., description="dataset of every stage (upcycle.data.list_datasets())")
    num_experts: int = Field(16, ge=1, description="experts per FFN (they must divide its hidden size)")
    partition: Literal["kmeans", "random"] = Field("kmeans", description="how hidden units are grouped")
    router_hidden: int = Field(128, ge=1, description="router MLP width d -> hidden -> e")
    attention: AttentionStage | None = Field(None, description="ViT: replace Q/K/V/O by ReLU MLPs first")
    sparsify: dict[str, Any] = Field(default_factory=dict, description="training recipe of the sparsity stage")
    routers: dict[str, Any] = Field(default_factory=dict, description="training recipe of the router stage")
    methods: list[Literal["d2dmoe", "moefication"]] = Field(["d2dmoe", "moefication"], min_length=1)
    moefication_activation: Literal["tanh", "relu"] = Field(
        "tanh", description="MoEfication router's hidden activation (tanh: its paper and code; relu: D2DMoE's)"
    )
    moefication_targets: Literal["batch_max", "token_max"] = Field(
        "batch_max", description="MoEfication router's BCE targets: activation sums over the batch's largest sum "
        "(its code) or over each token's largest sum",
    )  # fmt: skip
    taus: list[float] = Field(TAUS, description="D2DMoE thresholds to sweep (0 runs every expert)")
    zero_runs_all: bool = Field(
        False, description="D2DMoE, τ > 0: a token whose router predicts 0 for every expert runs all of them (the "
        "authors' code: r_i >= τ · 0 admits every expert) instead of none",
    )  # fmt: skip
    top_ks: list[int] | None = Field(None, description="MoEfication k to sweep (None: 1, 2, 4, ... up to E)")
    eval_examples: int | None = Field(None, ge=1, description="held-out examples per sweep point, an even stride "
                                      "through each split (None: all)")  # fmt: skip
    seed: int = Field(0, description="seed of every stage")

    @model_validator(mode="after")
    def _check(self):
        if any(not 0 <= tau <= 1 for tau in self.taus):
            raise ValueError(f"taus must lie in [0, 1] (0 runs every expert), got {self.taus}")
        if self.top_ks is not None and any(not 1 <= k <= self.num_experts for k in self.top_ks):
            raise ValueError(f"top_ks must lie in 1..num_experts={self.num_experts}, got {self.top_ks}")
        self.sparsify_config()  # a bad training field fails here, before any stage runs
        self.router_config()
        return self

    def ks(self) -> list[int]:
        if self.top_ks is not None:
            return sorted(set(self.top_ks))
        powers = [2**i for i in range(self.num_experts.bit_length()) if 2**i <= self.num_experts]
        return sorted({*powers, self.num_experts})

    def sparsify_config(self):
        aux = {**SPARSIFY_DEFAULTS["aux"], **NO_ROUTER_LOSSES, **self.sparsify.get("aux", {})}
        merged = {**stage_defaults(SPARSIFY_DEFAULTS, self.sparsify), **self.sparsify, "aux": aux, "data": self.data,
                  "seed": self.seed}  # fmt: skip
        config = load_train_config(merged)
        if config.aux.sparsity <= 0:
            raise ValueError("sparsify.aux.sparsity must be > 0: the stage exists to enforce activation sparsity")
        return config

    def router_config(self):
        aux = {**self.routers.get("aux", {}), **NO_ROUTER_LOSSES, "sparsity": 0.0, "router_fit": 1.0}
        merged = {**stage_defaults(ROUTER_DEFAULTS, self.routers), **self.routers, "aux": aux,
                  "freeze": "all_but_routers", "data": self.data, "seed": self.seed}  # fmt: skip
        return load_train_config(merged)


def load_recipe(source: str | Path | dict | D2DMoERecipe) -> D2DMoERecipe:
    """A recipe from YAML (its ``d2dmoe`` section, or the whole file), a dict or a recipe."""
    return load_recipe_section(source, "d2dmoe", D2DMoERecipe, "D2DMoE recipe")
