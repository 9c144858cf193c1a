"""``upcycle run RECIPE.yaml``: one YAML recipe, one whole pipeline, from the dense checkpoint to the report.

A recipe's ``run`` section names the dense model and where the run goes; the other sections say what happens:

    run:
      source: pretrained:vit_xs     # any SOURCE (HF folder, .gguf, timm:ARCH, saved folder), "smollm2",
                                    # "minilm" (with a fresh head of num_labels classes), or pretrained:PRESET
      pretrain: {data: fashion_mnist, epochs: 3}   # how every pretrained:PRESET of the recipe is trained (cached)
      finetune: {data: text_mixture, steps: 150}   # optional: dense training before conversion
      export: auto                  # optional: the converted (and trained) model exported (auto: its natural format)
    d2dmoe: {...}                   # the D2DMoE / MoEfication stages    (upcycle.methods.d2dmoe)
    bam: {...}                      # the BAM / BTX phases               (upcycle.methods.bam)
    convert: {...}                  # or a conversion (any method: sparse upcycling, MoE Jetpack, ...)
    train: {...}                    #    followed by fine-tuning

``pretrained:PRESET`` strings anywhere in ``convert.options`` (e.g. MoE Jetpack's ``predecessor``) resolve to the
same cached pre-training. Everything lands under ``--out`` (default ``runs/<recipe name>``); reruns resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator
from torch import nn

from .config import StrictModel, explain
from .errors import UserError, yaml_mapping
from .presets import Preset, apply_preset
from .recipes import recipe_file

PIPELINES = ("d2dmoe", "bam", "convert")
PRETRAINED = "pretrained:"


class RunSection(StrictModel):
    source: str = Field(..., description="SOURCE, smollm2, minilm, or pretrained:PRESET")
    out: str | None = Field(None, description="run folder (default: runs/<recipe name>)")
    pretrain: dict[str, Any] = Field(default_factory=dict, description="training recipe of pretrained:PRESET")
    model: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per PRESET: architecture overrides of pretrained:PRESET"
    )
    num_labels: int = Field(3, ge=2, description="minilm: classes of its fresh classification head")
    reset_head: int | None = Field(None, ge=2, description="image classifiers: a fresh head of N classes")
    finetune: dict[str, Any] | None = Field(None, description="dense training before conversion")
    export: str | None = Field(
        None,
        description="an export format (upcycle list formats), or auto: the first the model's adapter names that "
        "stores it",
    )

    @field_validator("export")
    @classmethod
    def _registered_format(cls, value: str | None) -> str | None:
        from .export import EXPORT_FORMATS

        if value not in (None, "auto"):
            EXPORT_FORMATS.entry(value)  # raises with the registered names
        return value


def load_run_recipe(path: str | Path, preset: Preset | None = None) -> tuple[RunSection, dict]:
    """The validated ``run`` section and the whole recipe; a recipe names exactly one pipeline. ``preset``
    (``paper`` / ``released``) sets that pipeline's documented switches to its paper's or released code's values."""
    path = recipe_file(path)
    recipe = yaml_mapping(path)
    if "run" not in recipe:
        raise UserError(f"{path} has no 'run' section (source, and optionally pretrain / finetune / export)")
    pipelines = [name for name in PIPELINES if name in recipe]
    if len(pipelines) != 1:
        raise UserError(f"{path} must hold exactly one of the sections {', '.join(PIPELINES)}; found {pipelines}")
    if not isinstance(recipe["run"], dict):
        raise UserError(f"the run section of {path} must be a mapping of keys, got {type(recipe['run']).__name__}")
    if preset is not None:
        method = pipelines[0] if pipelines[0] != "convert" else (recipe["convert"] or {}).get("method")
        recipe = apply_preset(recipe, method or "sparse_upcycling", preset)
    try:
        return RunSection(**recipe["run"]), recipe
    except ValidationError as error:
        raise UserError(explain(error, f"run section of {path.name}")) from None


def pretrained_dir(preset: str, run: RunSection, progress: bool) -> Path:
    from .pretrain import cached_pretrained

    if not run.pretrain:
        raise ValueError(f"{PRETRAINED}{preset} needs run.pretrain: the training recipe of the dense model")
    return cached_pretrained(preset, run.pretrain, progress=progress, model=run.model.get(preset, {}))


def load_run_source(run: RunSection, progress: bool) -> nn.Module:
    """The dense model the run starts from."""
    from .assets import minilm_classifier, smollm2_dir
    from .export import load
    from .sources import load_source

    if run.source.startswith(PRETRAINED):
        model = load(pretrained_dir(run.source.removeprefix(PRETRAINED), run, progress))
    elif run.source == "smollm2":
        model = load_source(str(smollm2_dir()))
    elif run.source == "minilm":
        model = minilm_classifier(run.num_labels)
    else:
        model = load_source(run.source)
    if run.reset_head is not None:
        model.reset_classifier(run.reset_head)
    return model


def resolve_options(options: dict, run: RunSection, progress: bool) -> dict:
    return {
        key: str(pretrained_dir(value.removeprefix(PRETRAINED), run, progress))
        if isinstance(value, str) and value.startswith(PRETRAINED) else value
        for key, value in options.items()
    }  # fmt: skip


def run_recipe(
    path: str | Path,
    out: str | Path | None = None,
    redo: bool = False,
    progress: bool = True,
    preset: Preset | None = None,
) -> dict:
    """Run the recipe's pipeline; returns its summary (with ``"out"``). ``preset``: see :func:`load_run_recipe`."""
    from .train import train

    run, recipe = load_run_recipe(path, preset)
    check_sections(run, recipe)
    out = Path(out or run.out or Path("runs") / Path(path).stem)
    model = load_run_source(run, progress)
    if run.finetune is not None:
        train(model, run.finetune, out / "dense", resume=(out / "dense" / "checkpoints").is_dir(), progress=progress)
    if "d2dmoe" in recipe:
        from .methods.d2dmoe import run_d2dmoe

        summary = run_d2dmoe(model, recipe["d2dmoe"], out, progress, redo)
        if run.export is not None:  # the models with routers; set_tau / set_top_k move them after loading
            summary["exported"] = export_stages(out, "3-*-routers", run.export)
        return {**summary, "out": str(out)}
    if "bam" in recipe:
        from .methods.bam import run_bam

        summary = run_bam(model, recipe["bam"], out, progress, redo)
        if run.export is not None:
            summary["exported"] = export_stages(out, "mix-*", run.export)
        return {**summary, "out": str(out)}
    return {**convert_and_train(model, recipe, run, out, progress), "out": str(out)}


def check_sections(run: RunSection, recipe: dict) -> None:
    """Every section validated before a model is loaded or trained, so a typo fails in seconds, not after the
    pre-training; the pipelines validate them again with the resolved model."""
    from .config import load_convert_config, load_train_config

    if run.finetune is not None:
        load_train_config(run.finetune)
    if "convert" in recipe:
        load_convert_config(recipe["convert"])
    if "train" in recipe:
        load_train_config(recipe["train"])
    if "d2dmoe" in recipe:
        from .methods.d2dmoe import load_recipe

        load_recipe(recipe["d2dmoe"])
    if "bam" in recipe:
        from .methods.bam import load_recipe

        load_recipe(recipe["bam"])


def export_stages(out: Path, pattern: str, format: str) -> dict[str, str | None]:
    """The model of every stage folder matching ``pattern``, exported next to it (``auto``: each in the format
    that expresses it)."""
    from .export import load

    return {folder.name: export_model(load(folder / "model"), out / f"export-{folder.name}", format)
            for folder in sorted(out.glob(pattern))}  # fmt: skip


def export_model(model: nn.Module, directory: Path, format: str) -> str | None:
    """``upcycle.export``; with ``auto`` (the family's exact twin that stores the model, else the generic class),
    None with the reasons printed when no format does (a BTX of parallel blocks: ``upcycle.load`` reads its saved
    folder)."""
    from .errors import UserError
    from .export import export

    try:
        return str(export(model, directory, format=format, overwrite=True))
    except UserError as error:
        if format != "auto":
            raise
        print(f"{directory.name}: not exported ({error})")
        return None


def convert_and_train(model: nn.Module, recipe: dict, run: RunSection, out: Path, progress: bool) -> dict:
    from .convert import convert
    from .export import save
    from .train import train
    from .verify import verify

    section = dict(recipe["convert"])
    section["options"] = resolve_options(section.get("options") or {}, run, progress)
    moe = convert(model, config=section, progress=progress)
    check = verify(moe, model)  # end to end and per layer: LayerScale models hide a wrong FFN end to end
    summary = {"max_abs_diff": check.end_to_end, "max_layer_rel_diff": check.worst_relative}
    print(f"max |moe - dense| on random inputs: {check.summary()}")
    save(moe, out / "converted", overwrite=True)
    if "train" in recipe:
        trained = train(moe, recipe["train"], out / "train", resume=(out / "train" / "checkpoints").is_dir(),
                        progress=progress)  # fmt: skip
        summary["val"] = trained["val"]
    if run.export is not None:
        summary["exported"] = export_model(moe, out / "export", run.export)
    return summary
