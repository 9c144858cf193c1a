"""The BAM / BTX recipe: every phase's settings in one validated YAML (docs/methods/bam.md).

    bam:
      domains: [shakespeare, python_code, python_docs]
      general_share: 0.1               # each branch: 90% its domain, 10% the others (the paper's general text)
      branch: {steps: 600, lr: 1e-3}   # continued pre-training of each copy of the seed
      mix: {steps: 600, lr: 5e-4}      # the mixture phase, on all domains in equal shares
      variants: [btx, bam_expert_kv, bam_shared_kv]
      dense_continued: true            # the seed continued on the mixture with bam_expert_kv's compute (FLOPs)
      dense_same_tokens: true          # ... and with the tokens of the branch and mix phases (equal data)
      dense_mix_compute: true          # ... and with the mixture phase's compute only (a weaker reference)
      compute_matched: true            # each BAM variant also trained for BTX's mix-phase compute (the paper's CM)

``branch`` and ``mix`` are training recipes (:class:`~upcycle.config.TrainConfig` fields; ``data``,
``data_options`` and ``seed`` come from here). The mixture phase always trains with the load-balancing loss and the
router z-loss on the FFN routers (``mix.aux`` sets their weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from ...config import StrictModel, TrainConfig, load_recipe_section, load_train_config, stage_defaults

Variant = Literal["btx", "bam_expert_kv", "bam_shared_kv"]
VARIANTS: dict[str, dict] = {  # upcycle.merge arguments of each variant
    "btx": {"method": "btx"},
    "bam_expert_kv": {"method": "bam", "shared_kv": False},
    "bam_shared_kv": {"method": "bam", "shared_kv": True},
}
BRANCH_DEFAULTS = {"steps": 600, "batch_size": 16, "lr": 1e-3, "warmup": 0.05, "weight_decay": 0.1}
MIX_DEFAULTS = {"steps": 600, "batch_size": 16, "lr": 5e-4, "warmup": 0.05, "weight_decay": 0.1,
                "aux": {"load_balancing": 0.01, "z_loss": 0.001}}  # fmt: skip


class BAMRecipe(StrictModel):
    data: str = Field("text_mixture", description="a dataset of domains with per-domain weights (text_mixture)")
    domains: list[str] | dict[str, str] = Field(
        ["shakespeare", "python_code", "python_docs"], min_length=1,
        description="one branch per domain, in expert order after the seed: text_mixture's domains, or "
        "{name: SPEC} of the user's text (a text file, a folder, a hub dataset) per domain",
    )  # fmt: skip
    general_share: float = Field(0.1, ge=0, lt=1, description="share of the other domains in a branch's data")
    branch: dict[str, Any] = Field(default_factory=dict, description="training recipe of each branch")
    mix: dict[str, Any] = Field(default_factory=dict, description="training recipe of the mixture phase")
    variants: list[Variant] = Field(["btx", "bam_expert_kv", "bam_shared_kv"], min_length=1)
    top_k: int = Field(1, ge=1, description="FFN experts per token")
    renormalize: bool = Field(False, description="divide the top-k probabilities by their sum (papers: no)")
    router_init_std: float = Field(0.02, ge=0, description="std of the random routers")
    router_init: Literal["normal", "data"] = Field(
        "normal", description="FFN routers of each mixture: random, or from data (a branch's row points at the mean "
        "hidden state of its domain, the seed's at all domains pooled; mergekit's hidden-state gates)",
    )  # fmt: skip
    btx_top_k: int | None = Field(None, ge=1, description="BTX's FFN experts per token when it differs from BAM's "
                                  "(the BTX paper: 2; None: top_k, as in BAM's BTX baseline)")  # fmt: skip
    btx_renormalize: bool | None = Field(None, description="BTX's router weights: softmax over the chosen experts "
                                         "(the BTX paper's SoftMax(TopK(Wx))); None: renormalize, as in BAM's "
                                         "BTX baseline")  # fmt: skip
    compute_matched: bool = Field(False, description="also train each BAM variant's mixture for BTX's mix-phase "
                                  "compute: mix steps x MACs(btx) / MACs(variant), the paper's compute-matched "
                                  "comparison (needs btx among the variants)")  # fmt: skip
    dense_continued: bool = Field(True, description="also continue the seed on the mixture with the same compute")
    compute_reference: Variant = Field("bam_expert_kv", description="the variant whose compute the dense run matches")
    dense_same_tokens: bool = Field(True, description="with dense_continued: also continue the seed for the "
                                    "branch and mix phases' steps (equal training tokens, fewer FLOPs)")  # fmt: skip
    dense_mix_compute: bool = Field(True, description="with dense_continued: also continue the seed with the "
                                    "mixture phase's compute only (a weaker dense reference)")  # fmt: skip
    eval_sequences: int | None = Field(None, ge=1, description="held-out sequences per domain, evenly strided "
                                       "(None: all)")  # fmt: skip
    seed: int = Field(0, description="seed of every phase")

    @model_validator(mode="after")
    def _check(self):
        if len(set(self.domains)) != len(self.domains):
            raise ValueError(f"domains must be distinct, got {self.domains}")
        if isinstance(self.domains, dict) and self.data != "text_mixture":
            raise ValueError("domains given as {name: SPEC} are mixed by the text_mixture dataset; set data: "
                             "text_mixture")  # fmt: skip
        if self.data == "text_mixture" and isinstance(self.domains, list):
            from ...data.text_mixture import DOMAINS

            unknown = sorted(set(self.domains) - set(DOMAINS))
            if unknown:
                raise ValueError(f"unknown domain(s) {', '.join(unknown)}; text_mixture has {', '.join(DOMAINS)}")
        for name, k in (("top_k", self.top_k), ("btx_top_k", self.btx_top_k)):
            if k is not None and k > len(self.domains) + 1:
                raise ValueError(f"{name}={k} is larger than the {len(self.domains) + 1} experts (branches + seed)")
        if self.compute_matched and ("btx" not in self.variants or self.variants == ["btx"]):
            raise ValueError("compute_matched trains BAM for BTX's compute: variants need btx and a bam variant")
        if self.dense_continued and self.compute_reference not in self.variants:
            raise ValueError(f"compute_reference {self.compute_reference!r} is not among the variants {self.variants}")
        configs = [self.branch_config(d) for d in self.domains]  # a bad training field fails before any phase runs
        configs.append(self.mix_config())
        if (self.dense_continued or self.compute_matched) and any(config.steps is None for config in configs):
            raise ValueError("branch and mix need steps, not epochs: the dense and compute-matched runs match their "
                             "compute in steps")  # fmt: skip
        return self

    def router_init_domains(self) -> list[str | list[str]] | None:
        """Calibration data per expert for ``router_init: data``: the seed, then one set per branch."""
        if self.router_init == "normal":
            return None
        branches = list(self.domains.values()) if isinstance(self.domains, dict) else list(self.domains)
        return [branches, *branches]

    def routing(self, variant: str) -> dict:
        """The FFN router of ``variant``'s mixture: ``top_k`` and ``renormalize`` (BTX may have its own)."""
        if variant == "btx":
            renormalize = self.renormalize if self.btx_renormalize is None else self.btx_renormalize
            return {"top_k": self.btx_top_k or self.top_k, "renormalize": renormalize}
        return {"top_k": self.top_k, "renormalize": self.renormalize}

    def branch_weights(self, domain: str) -> dict[str, float]:
        others = [d for d in self.domains if d != domain]
        if not others:
            return {domain: 1.0}
        return {domain: 1 - self.general_share, **{d: self.general_share / len(others) for d in others}}

    def data_options(self, **options) -> dict:
        """``options`` of the mixture dataset, with the user's SPEC per domain when the recipe names them."""
        return {**options, "sources": dict(self.domains)} if isinstance(self.domains, dict) else options

    def branch_config(self, domain: str) -> TrainConfig:
        return self._config(BRANCH_DEFAULTS, self.branch, self.data_options(weights=self.branch_weights(domain)))

    def mix_config(self, steps: int | None = None) -> TrainConfig:
        """The mixture phase (all domains in equal shares); ``steps`` overrides its length (the dense run)."""
        config = self._config(MIX_DEFAULTS, self.mix, self.data_options(weights=dict.fromkeys(self.domains, 1.0)))
        return config if steps is None else load_train_config(config, steps=steps, epochs=None)

    def _config(self, defaults: dict, given: dict, data_options: dict) -> TrainConfig:
        aux = {**defaults.get("aux", {}), **given.get("aux", {})}
        return load_train_config({**stage_defaults(defaults, given), **given, "aux": aux, "data": self.data,
                                  "data_options": data_options, "seed": self.seed})  # fmt: skip


def load_recipe(source: str | Path | dict | BAMRecipe | None = None) -> BAMRecipe:
    """A recipe from YAML (its ``bam`` section, or the whole file), a dict or a recipe; None: the defaults."""
    return load_recipe_section(source, "bam", BAMRecipe, "BAM recipe", empty_ok=True)
