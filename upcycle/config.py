"""Typed, validated recipes. YAML in, the same YAML saved next to every output.

Validation happens here, at the boundary, with messages that say what to change. Method-specific options live in
``options`` and are validated by the options model each recycling method registers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError, yaml_mapping
from .recipes import recipe_file

LayerSelection = Literal["all", "every_other", "last_half"] | list[int]
# recipe fields that choose how a model computes, not what it is: they apply to the model in hand and are never saved
# with it (a saved model loads with the default expert backend, whatever was active when it was saved)
RUNTIME_FIELDS = frozenset({"backend"})
# training fields that change how a run is logged and checkpointed, not the model it trains (a resumed run ends on
# the same weights): a pipeline stage built under other values of these is still the same stage
BOOKKEEPING_FIELDS = frozenset({"checkpoint_every", "keep_checkpoints", "log_every"})


class StrictModel(BaseModel):
    # strict: YAML's `true` is not an integer and "1e-3" is not a float (an int still passes for a float); no NaN or
    # Inf anywhere, so a typo such as `lr: .inf` fails here rather than as NaN weights at the end of a run
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class RouterConfig(StrictModel):
    type: str = Field("topk", description="a registered router (upcycle list routers): topk, soft, sphero, ...")
    init: str = Field("normal", description="router weight init (upcycle list router_inits): zero, normal, data")
    init_std: float = Field(0.02, gt=0, description="std of the normal router init")
    init_data: str | None = Field(None, description="init data: the calibration dataset (train split)")
    init_examples: int = Field(64, ge=1, description="init data: calibration examples")
    renormalize: bool = Field(True, description="divide the top-k weights by their sum (Mixtral); False: Switch/BAM")
    noise_std: float = Field(0.0, ge=0, description="Gaussian logit noise, training only")
    capacity_factor: float | None = Field(None, gt=0, description="per-expert capacity = factor·t·k/e; None: no limit")
    slots_per_expert: int = Field(1, ge=1, description="Soft MoE slots per expert")
    options: dict[str, Any] = Field(default_factory=dict, description="the router's own arguments (e.g. hidden, tau)")

    @field_validator("init")
    @classmethod
    def _registered_init(cls, value: str) -> str:
        from .recycling.routers import ROUTER_INITS

        ROUTER_INITS.entry(value)  # raises with the registered names
        return value

    @model_validator(mode="after")
    def _data_init_names_its_data(self):
        if (self.init == "data") != (self.init_data is not None):
            raise ValueError("router init 'data' and init_data go together: name the calibration dataset with "
                             "init_data (e.g. shakespeare) and set init: data")  # fmt: skip
        return self


class ConvertConfig(StrictModel):
    method: str = Field("sparse_upcycling", description="a registered recycling method (upcycle.list_methods())")
    num_experts: int = Field(8, ge=1, description="experts per MoE layer")
    top_k: int = Field(2, ge=1, description="experts per token (top-k routers)")
    layers: LayerSelection = Field("all", description="which FFNs become MoE: all, every_other, last_half, or indices")
    router: RouterConfig = Field(default_factory=RouterConfig)
    backend: str = Field("auto", description="expert compute backend (upcycle.list_backends())")
    seed: int = Field(0, description="seed for every random choice of the conversion")
    options: dict[str, Any] = Field(default_factory=dict, description="method-specific options")

    @field_validator("layers")
    @classmethod
    def _layers_non_negative(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("layers: an explicit list must name at least one FFN index")
            if any(i < 0 for i in value) or len(set(value)) != len(value):
                raise ValueError(f"layers: indices must be distinct and >= 0, got {value}")
        return value

    @model_validator(mode="after")
    def _check(self):
        from .layers import list_backends
        from .recycling import get_method
        from .recycling.routers import router_arguments

        if self.backend not in list_backends():
            raise ValueError(f"backend {self.backend!r} is unknown; choose one of {list_backends()}")
        arguments = router_arguments(self.router.type)  # raises with the list of routers
        unknown = sorted(set(self.router.options) - set(arguments))
        if unknown:
            raise ValueError(f"router {self.router.type!r} takes no option {', '.join(unknown)}; its options: "
                             f"{', '.join(arguments)}")  # fmt: skip
        method = get_method(self.method)  # raises with the list of methods
        if method.options_model is not None:
            # validate, fill defaults and keep the resolved options, so the saved recipe is complete
            resolved = method.options_model(**self.options).model_dump()
            object.__setattr__(self, "options", resolved)
        elif self.options:
            raise ValueError(f"method {self.method!r} takes no options, got {sorted(self.options)}")
        routed_experts = self.num_experts * int(self.options.get("granularity", 1))
        if "top_k" in arguments and self.top_k > routed_experts:
            raise ValueError(
                f"top_k={self.top_k} is larger than the {routed_experts} experts per layer; "
                f"lower --top-k or raise --experts"
            )
        return self


def load_convert_config(
    source: str | Path | dict | ConvertConfig | None = None, preset: str | None = None, **overrides
) -> ConvertConfig:
    """A config from a YAML path, a dict or a config object, with keyword overrides applied on top.

    Unknown top-level keywords are method options (``granularity=2`` -> ``options.granularity``). ``preset``
    (``paper`` / ``released``) sets the method's documented switches to its paper's or released code's values
    (upcycle.methods.choices), under the overrides.
    """
    if isinstance(source, ConvertConfig):
        data = source.model_dump()
    elif isinstance(source, (str, Path)):
        path = recipe_file(source, "config")
        data = yaml_mapping(path, "config")
        data = data.get("convert", data)
        if not isinstance(data, dict):
            raise UserError(f"the convert section of {path} must be a mapping of keys, got {type(data).__name__}")
    else:
        data = dict(source or {})
    if preset is not None:
        from .presets import apply_preset

        method = overrides.get("method") or data.get("method") or ConvertConfig.model_fields["method"].default
        data = apply_preset(data, method, preset, section="convert")
    fields = set(ConvertConfig.model_fields)
    router_fields = set(RouterConfig.model_fields)
    options = dict(data.pop("options", {}) or {})
    router = dict(data.pop("router", {}) or {})
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("router", "options"):  # a section given whole, on top of the recipe's
            if not isinstance(value, (dict, BaseModel)):
                raise UserError(f"{key} must be a mapping of its keys, got {type(value).__name__}: {value!r}")
            section = router if key == "router" else options
            section.update(value.model_dump(exclude_unset=True) if isinstance(value, BaseModel) else value)
        elif key in fields:
            data[key] = value
        elif key == "router_options":  # on top of the recipe's router options
            router["options"] = {**(router.get("options") or {}), **value}
        elif key.startswith("router_") and key[len("router_") :] in router_fields:
            router[key[len("router_") :]] = value
        else:
            options[key] = value
    try:
        return ConvertConfig(**data, router=router, options=options)
    except ValidationError as error:
        raise UserError(explain(error)) from None


def explain(error: ValidationError, what: str = "conversion config", whole: str = "config") -> str:
    """A pydantic error as one line per bad field, under ``invalid <what>:`` (``whole``: a check of the whole)."""
    lines = [f"invalid {what}:"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or whole
        given, scalar = item.get("input"), isinstance(item.get("input"), bool | int | float | str)
        got = f", got {given!r}" if scalar and item["type"] != "value_error" else ""
        lines.append(f"  {where}: {item['msg']}{got}")
    return "\n".join(lines)


def to_yaml(config: BaseModel, section: str = "convert") -> str:
    return yaml.safe_dump({section: config.model_dump(mode="json")}, sort_keys=False)


class AuxLossConfig(StrictModel):
    load_balancing: float = Field(0.01, ge=0, description="Switch load-balancing coefficient (top-k routers)")
    z_loss: float = Field(0.001, ge=0, description="ST-MoE router z-loss coefficient")
    sequence_balance: float = Field(
        0.0001, ge=0, description="DeepSeek-V3 sequence-wise balance loss coefficient (sigmoid routers; paper: 0.0001)"
    )
    sparsity: float = Field(0.0, ge=0, description="activation-sparsity coefficient on FFN activations (D2DMoE)")
    sparsity_kind: Literal["hoyer", "l1"] = Field("hoyer", description="squared Hoyer or L1")
    sparsity_ramp: float = Field(0.5, ge=0, le=1, description="fraction of training over which sparsity ramps up")
    sparsity_mean: Literal["per_group", "pooled"] = Field(
        "per_group", description="per_group: mean over the FFNs plus mean over the attention-projection MLPs (D2DMoE's "
        "code); pooled: one mean over all of them, which weakens the FFN term when projections are included",
    )  # fmt: skip
    router_fit: float = Field(
        0.0, ge=0, description="fit routers to their experts' measured outputs (D2DMoE/MoEfication router stage)"
    )


class TrainConfig(StrictModel):
    """One training run: the same loop pre-trains dense models and fine-tunes MoE models."""

    data: str = Field(..., description="a built-in dataset (upcycle list datasets), a file, a folder or a hub "
                                        "dataset id (ORG/NAME[:CONFIG])")  # fmt: skip
    data_options: dict[str, Any] = Field(
        default_factory=dict, description="dataset options, e.g. text_mixture weights: {shakespeare: 0.9, ...}, or "
        "text_column / label_column / image_column / val_fraction of the user's data",
    )  # fmt: skip
    task: Literal["causal-lm", "text-classification", "image-classification"] | None = Field(
        None, description="what the model is trained for (None: its family's task)"
    )
    steps: int | None = Field(None, ge=1, description="optimizer steps; exactly one of steps / epochs")
    epochs: float | None = Field(None, gt=0, description="passes over the training split")
    batch_size: int = Field(64, ge=1, description="global batch (all processes, all accumulation micro-steps)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final LR as a fraction of the peak (cosine)")
    weight_decay: float = Field(0.05, ge=0, description="AdamW decay; never on norms, biases, temperatures")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    warmup: float = Field(0.05, ge=0, description="warm-up steps, or a fraction of all steps when < 1")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR decay after warm-up")
    router_lr_scale: float = Field(1.0, gt=0, description="router LR = lr × this")
    layer_decay: float | None = Field(None, gt=0, le=1, description="layer-wise LR decay (None: off)")
    grad_clip: float | None = Field(1.0, gt=0, description="max global gradient norm (None: off)")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 autocast on CPU and GPU")
    aux: AuxLossConfig = Field(default_factory=AuxLossConfig)
    freeze: Literal["none", "all_but_routers", "experts"] = Field("none", description="what stays fixed")
    ema: float | None = Field(None, gt=0, lt=1, description="EMA decay of the weights (None: off)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="image classification")
    mixup: float = Field(0.0, ge=0, description="Mixup alpha (0: off)")
    cutmix: float = Field(0.0, ge=0, description="CutMix alpha (0: off)")
    augment: bool = Field(True, description="train-time crop/flip where the dataset allows")
    seq_len: int = Field(128, ge=2, description="tokens per packed sequence (text)")
    eval_every: int | None = Field(None, ge=1, description="validate every N steps (None: at the end only)")
    eval_batches: int | None = Field(None, ge=1, description="cap on validation batches (None: the whole split)")
    checkpoint_every: int = Field(200, ge=1, description="write a resumable checkpoint every N steps")
    checkpoints: bool = Field(
        True,
        description="write resumable checkpoints (off: only the final model is saved; "
        "saves ~3x the model's size in memory and disk for big models, but a run cannot resume)",
    )
    keep_checkpoints: int = Field(2, ge=1, description="how many recent checkpoints to keep")
    log_every: int = Field(10, ge=1, description="metrics row every N steps")
    seed: int = Field(0, description="every random choice of the run derives from it")
    device: str = Field("auto", description="auto, cpu or cuda")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun: ddp replicates the model, fsdp shards it (large LMs)"
    )

    @field_validator("betas", mode="before")
    @classmethod
    def _betas_from_yaml(cls, value):
        # YAML has lists, not tuples; strict mode would refuse [0.9, 0.95]
        return tuple(value) if isinstance(value, list) else value

    @model_validator(mode="after")
    def _check(self):
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of steps and epochs")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.strategy == "fsdp" and self.ema:
            raise ValueError("ema is not supported with strategy fsdp (the average would need the full weights)")
        if self.data_options:
            self._check_data_options()
        return self

    def _check_data_options(self) -> None:
        from .data.registry import dataset_options

        set_by_the_run = sorted(set(self.data_options) & {"seq_len", "seed", "tokenizer", "image_size", "channels",
                                                          "augment", "task", "data_config", "pad_id"})  # fmt: skip
        if set_by_the_run:
            raise ValueError(f"data_options {set_by_the_run} are set by the training run itself; use the top-level "
                             "training keys (seq_len, seed, augment, task) instead")  # fmt: skip
        unknown = sorted(set(self.data_options) - set(dataset_options(self.data)))
        if unknown:
            raise ValueError(f"dataset {self.data!r} has no option {', '.join(unknown)}; options: "
                             f"{', '.join(dataset_options(self.data))}")  # fmt: skip


def load_train_config(source: str | Path | dict | TrainConfig | None = None, **overrides) -> TrainConfig:
    """A training config from YAML (its ``train`` section), a dict or an object, with keyword overrides."""
    if isinstance(source, TrainConfig):
        data = source.model_dump()
    elif isinstance(source, (str, Path)):
        path = recipe_file(source, "config")
        loaded = yaml_mapping(path, "config")
        data = loaded.get("train", loaded)
        if not isinstance(data, dict):
            raise UserError(f"the train section of {path} must be a mapping of keys, got {type(data).__name__}")
        data = dict(data)
    else:
        data = dict(source or {})
    aux = dict(data.pop("aux", {}) or {})
    for key, value in overrides.items():
        if value is None:
            continue
        if key in AuxLossConfig.model_fields:
            aux[key] = value
        else:
            data[key] = value
    try:
        return TrainConfig(**data, aux=aux)
    except ValidationError as error:
        raise UserError(explain(error, "training config")) from None


def stage_defaults(defaults: dict, given: dict) -> dict:
    """A pipeline stage's training defaults that the user's section does not override; its length goes whole (a
    user's steps replace the default epochs, and the other way round)."""
    length_given = "steps" in given or "epochs" in given
    return {k: v for k, v in defaults.items() if not (length_given and k in ("steps", "epochs"))}


def load_recipe_section(source, section: str, model: type[BaseModel], what: str, empty_ok: bool = False):
    """A pipeline recipe (``model``) from YAML (its ``section``, or the whole file), a dict or an instance;
    ``empty_ok``: None gives the defaults."""
    if isinstance(source, model):
        return source
    if isinstance(source, (str, Path)):
        path = recipe_file(source, "recipe")
        loaded = yaml_mapping(path)
        source = loaded.get(section, loaded)
    if source is None and empty_ok:
        source = {}
    if not isinstance(source, dict):
        raise UserError(f"a {what} is a mapping of settings, got {type(source).__name__}")
    try:
        return model(**source)
    except ValidationError as error:
        raise UserError(explain(error, what, whole="recipe")) from None


def select_layers(count: int, selection: LayerSelection) -> list[int]:
    """Indices of the FFNs to convert among ``count``: all, every other (1, 3, 5, ...), the last half, or a list."""
    if selection == "all":
        return list(range(count))
    if selection == "every_other":
        return list(range(1, count, 2))  # odd layers, as Switch / GShard interleave MoE with dense layers
    if selection == "last_half":
        return list(range(count // 2, count))
    out_of_range = [i for i in selection if i >= count]
    if out_of_range:
        raise ValueError(f"layers {out_of_range} do not exist: the model has {count} FFNs (indices 0..{count - 1})")
    return sorted(selection)
