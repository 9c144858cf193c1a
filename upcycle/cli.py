"""The ``upcycle`` command line: a thin shell that parses arguments and calls the library.

Every subcommand maps onto the function a notebook would call; ``--config recipe.yaml`` gives a recipe and flags
override it.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys

import yaml

from . import __version__
from .bench import BENCHMARKS
from .errors import UserError, parse_yaml, positive_finite
from .export import EXPORT_FORMATS
from .export.gguf import ARCHES as GGUF_ARCHES
from .layers import list_backends, list_routers
from .presets import PRESETS, apply_preset
from .recycling import list_methods
from .recycling.routers import ROUTER_INITS
from .registry import Registry
from .sources import DTYPES

EXAMPLES = """\
examples:
  upcycle demo                                        the main job on real checkpoints (~10 min on 2 cores)
  upcycle convert SOURCE --experts 8 --top-k 2 --out DIR
  upcycle verify DIR --against SOURCE                 max |moe - dense| end to end and per layer
  upcycle train DIR --data shakespeare --steps 200 --out RUN
  upcycle export RUN/model --format mixtral --out HF_DIR
  upcycle run moefication_minilm         a whole paper pipeline from one recipe

SOURCE: a Hugging Face model folder or hub id (ORG/NAME[@REVISION]), a .gguf file, timm:ARCH.TAG (or timm:ARCH
with --pretrained, --checkpoint or --random-init), or a folder written by upcycle.
Each command has its own --help; the README is the guide and docs/cli.md the reference.
"""


def _add_recipe_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="recipe YAML (its 'convert' section); flags below override it")
    parser.add_argument("--method", choices=[m["name"] for m in list_methods()],
                        help="recycling method (upcycle list methods); default sparse_upcycling")  # fmt: skip
    parser.add_argument("--experts", type=int, dest="num_experts", help="experts per MoE layer (default 8)")
    parser.add_argument("--top-k", type=int, dest="top_k", help="experts per token (default 2)")
    parser.add_argument("--layers", help="all | every_other | last_half | comma-separated FFN indices")
    parser.add_argument("--router", dest="router_type", choices=list_routers(),
                        help="router (upcycle list routers); default topk")  # fmt: skip
    parser.add_argument("--router-option", dest="router_options", action="append", default=[], metavar="KEY=VALUE",
                        help="an argument of the chosen router, e.g. --router --router-option hidden=64")  # fmt: skip
    parser.add_argument("--router-init", dest="router_init", choices=ROUTER_INITS.names(),
                        help="new router weights: zeros (uniform routing at start), normal, or data (rows from "
                             "calibration activations; name the set with --router-init-data)")  # fmt: skip
    parser.add_argument("--router-init-std", dest="router_init_std", type=float, help="std of --router-init normal")
    parser.add_argument("--router-init-data", dest="router_init_data", metavar="DATA",
                        help="--router-init data: calibration dataset (train split), e.g. shakespeare")  # fmt: skip
    renormalize = parser.add_mutually_exclusive_group()
    renormalize.add_argument("--renormalize", dest="router_renormalize", action="store_true", default=None,
                             help="renormalise top-k weights to sum 1 (Mixtral; default)")  # fmt: skip
    renormalize.add_argument("--no-renormalize", dest="router_renormalize", action="store_false",
                             help="use raw softmax probabilities (Switch, BAM)")  # fmt: skip
    parser.add_argument("--capacity-factor", dest="router_capacity_factor", type=float,
                        help="expert capacity as a multiple of the even share; overflow pairs are dropped")  # fmt: skip
    parser.add_argument("--slots-per-expert", dest="router_slots_per_expert", type=int,
                        help="Soft MoE slots per expert")  # fmt: skip
    parser.add_argument("--backend", choices=list_backends(), help="expert compute backend (upcycle list backends)")
    parser.add_argument("--seed", type=int, help="every random choice of the conversion derives from it (default 0)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a method option, e.g. --set granularity=2 --set partition=random")  # fmt: skip


def _recipe_overrides(args: argparse.Namespace) -> dict:
    keys = ["method", "num_experts", "top_k", "backend", "seed", "router_type", "router_init", "router_init_std",
            "router_init_data", "router_renormalize", "router_capacity_factor", "router_slots_per_expert"]  # fmt: skip
    overrides = {key: getattr(args, key) for key in keys}
    positive_finite(args.router_init_std, "--router-init-std")
    if args.layers is not None:
        named = ("all", "every_other", "last_half")
        indices = args.layers.split(",")
        if args.layers not in named and not all(i.strip().isdigit() for i in indices):
            raise UserError(f"--layers takes {', '.join(named)} or comma-separated FFN indices, got {args.layers!r}")
        overrides["layers"] = args.layers if args.layers in named else [int(i) for i in indices]
    overrides.update(_key_values(args.set))
    overrides["router_options"] = _key_values(args.router_options) or None
    return overrides


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_source

    result = convert_source(
        args.source, args.out, args.config, checkpoint=args.checkpoint, allow_pickle=args.allow_pickle,
        pretrained=args.pretrained, random_init=args.random_init, dtype=args.dtype, overwrite=args.overwrite,
        stream=args.stream, export=args.export, layout=args.layout, check=args.check, preset=args.preset,
        **_recipe_overrides(args),
    )  # fmt: skip
    print(f"wrote {result['out']}" + (f" ({args.export})" if args.export else ""))
    if result.get("max_abs_diff") is not None:
        print(f"max |moe - dense| = {result['max_abs_diff']:.3e} on random inputs")
    if result.get("worst_relative") is not None:
        print(f"every converted layer checked against its dense FFN: worst {result['worst_layer']}, max |moe - dense| "
              f"/ max |dense| = {result['worst_relative']:.3e}")  # fmt: skip
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .export import load
    from .verify import verify

    moe = load(args.directory)
    dense = _load_source(args, args.against)
    result = verify(moe, dense, seed=args.seed)
    ok_end = result.end_to_end <= args.atol
    print(f"max |moe - dense| = {result.end_to_end:.3e} end to end ({'within' if ok_end else 'ABOVE'} atol "
          f"{args.atol:g})")  # fmt: skip
    ok_layers = all(value <= args.rtol for value in result.per_layer.values())  # NaN fails
    if result.per_layer:  # LayerScale models hide a wrong FFN end to end; its own output shows it
        print(
            f"worst layer {result.worst_layer}: max |moe - dense| / max |dense| = {result.worst_relative:.3e} "
            f"({'within' if ok_layers else 'ABOVE'} rtol {args.rtol:g}; {len(result.per_layer)} layers compared)"
        )
    return 0 if ok_end and ok_layers else 1


def _cmd_export(args: argparse.Namespace) -> int:
    from .atomic import check_not_overlapping
    from .export import chosen_format, export, load

    check_not_overlapping(args.out, args.directory, args.overwrite)
    options = {key: value for key in ("layout", "arch") if (value := getattr(args, key))}
    model = load(args.directory)
    if args.dtype != "auto":
        model.to(DTYPES[args.dtype])
    path = export(model, args.out, format=args.format, overwrite=args.overwrite, **options)
    print(f"wrote {path} ({chosen_format(path) or args.format})")
    return 0


def _data_flags(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """--data SPEC and how to read the user's data."""
    parser.add_argument("--data", required=required,
                        help="a built-in dataset (upcycle list datasets), a .jsonl/.json/.csv/.parquet/.txt file, a "
                        "save_to_disk folder, an image folder (a sub-folder per class) or a hub dataset "
                        "ORG/NAME[:CONFIG]")  # fmt: skip
    parser.add_argument("--task", choices=["causal-lm", "text-classification", "image-classification"],
                        help="what to train or evaluate for (default: the model family's task)")  # fmt: skip
    parser.add_argument("--text-column", help="the column holding the text (default: detected, e.g. text)")
    parser.add_argument("--label-column", help="the column holding the label (default: detected, e.g. label)")
    parser.add_argument("--image-column", help="the column holding the image (default: detected, e.g. image)")
    parser.add_argument("--val-fraction", type=float,
                        help="held-out share for each split the data lacks (default 0.1)")  # fmt: skip


def _data_options(args: argparse.Namespace) -> dict:
    keys = ("text_column", "label_column", "image_column", "val_fraction")
    return {key: getattr(args, key) for key in keys if getattr(args, key, None) is not None}


def _train_flags(parser: argparse.ArgumentParser, freeze: bool = True) -> None:
    _data_flags(parser)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps")
    length.add_argument("--epochs", type=float, help="passes over the training split")
    parser.add_argument("--out", required=True, help="run folder: checkpoints, metrics.csv, curves.png, model/")
    parser.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in --out")
    parser.add_argument("--config", help="recipe YAML (its 'train' section); flags override it")
    parser.add_argument("--batch-size", type=int, dest="batch_size", help="global batch (default 64)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="bf16 autocast (faster on CPUs with bf16)")
    if freeze:  # a model trained from scratch has nothing to keep fixed
        parser.add_argument("--freeze", choices=["none", "all_but_routers", "experts"], help="what stays fixed")
    parser.add_argument("--seed", type=int, help="every random choice of the run derives from it (default 0)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any training option, e.g. --set warmup=0.1 --set load_balancing=0.01")  # fmt: skip


def _train_overrides(args: argparse.Namespace) -> dict:
    keys = ["data", "task", "steps", "epochs", "batch_size", "lr", "precision", "freeze", "seed"]
    overrides = {key: getattr(args, key, None) for key in keys}
    if _data_options(args):
        overrides["data_options"] = _data_options(args)
    overrides.update(_key_values(args.set))
    return overrides


def _key_values(items: list[str]) -> dict:
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            values[key] = parse_yaml(value)  # numbers (1e-3 too), booleans and strings as recipes read them
        except yaml.YAMLError:
            raise UserError(f"--set {key}: {value!r} is not a YAML value (quote it: --set 'k=[1, 2]')") from None
    return values


def _cmd_train(args: argparse.Namespace) -> int:
    from .atomic import check_not_overlapping
    from .config import load_train_config
    from .sources import load_source
    from .train import train

    check_not_overlapping(args.out, args.directory, overwrite=True)  # the run replaces OUT/model
    model = load_source(args.directory)
    cfg = load_train_config(args.config, **_train_overrides(args))
    if args.num_labels is not None or args.reset_head:
        from .heads import classes_in, with_classifier

        model = with_classifier(model, args.num_labels or classes_in(cfg.data, cfg.data_options, cfg.seed))
    summary = train(model, cfg, args.out, resume=args.resume)
    _print_summary(summary)
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from .pretrain import pretrain

    summary = pretrain(args.arch, args.out, args.config, resume=args.resume, **_train_overrides(args))
    _print_summary(summary)
    return 0


def _pipeline_flags(parser: argparse.ArgumentParser, recipe_help: str, out_help: str, set_example: str,
                    recipe_required: bool = True) -> None:  # fmt: skip
    """SOURCE, --recipe, --out, --set and --redo of a multi-stage pipeline command (d2dmoe, bam)."""
    parser.add_argument("source", help="the dense model")
    parser.add_argument("--recipe", required=recipe_required, help=recipe_help)
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"a recipe field, e.g. {set_example}")  # fmt: skip
    parser.add_argument("--redo", action="store_true",
                        help="rebuild stages whose recipe fields changed (default: stop and name them)")  # fmt: skip
    _preset_flag(parser, "the method")
    _source_flags(parser)


def _pipeline_recipe(load, args: argparse.Namespace, section: str):
    """The pipeline's recipe from --recipe, the --preset's values and the --set fields on top, validated again."""
    recipe = load(args.recipe)
    if not args.preset and not args.set:
        return recipe
    fields = recipe.model_dump()
    if args.preset:
        fields = apply_preset(fields, section, args.preset, section=section)
    return load({**fields, **_key_values(args.set)})


def _preset_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--preset", choices=PRESETS,
                        help=f"set {what}'s documented switches to its paper's or its authors' released code's values "
                             "(docs/methods); --set still applies on top")  # fmt: skip


def _cmd_d2dmoe(args: argparse.Namespace) -> int:
    from .methods.d2dmoe import load_recipe, run_d2dmoe

    recipe = _pipeline_recipe(load_recipe, args, "d2dmoe")
    summary = run_d2dmoe(_load_source(args, args.source), recipe, args.out, redo=args.redo)
    for method in recipe.methods:
        fraction, point = summary[f"{method}.flops_fraction_at_1pt_drop"], summary[f"{method}.point_at_1pt_drop"]
        knob = "tau" if method == "d2dmoe" else "k"
        print(f"{method}: MACs fraction within 1 point of dense (val) = {fraction} at {knob} = {point}")
    print(f"wrote {args.out}/summary.json and {summary['curves_png']}")
    return 0


def _cmd_bam(args: argparse.Namespace) -> int:
    from .methods.bam import load_recipe, run_bam

    recipe = _pipeline_recipe(load_recipe, args, "bam")
    summary = run_bam(_load_source(args, args.source), recipe, args.out, redo=args.redo)
    for name in ("seed", "dense_continued", *recipe.variants):
        if f"{name}_ppl" in summary:
            print(f"{name}: average held-out test perplexity {summary[f'{name}_ppl']:.3f}")
    if "bam_over_btx" in summary:
        print(f"bam_expert_kv / btx = {summary['bam_over_btx']:.3f}")
    print(f"wrote {args.out}/summary.json and {summary['plot']}; models in {args.out}/mix-<variant>/model")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .run import run_recipe

    summary = run_recipe(args.recipe, args.out, redo=args.redo, preset=args.preset)
    headline = {k: v for k, v in summary.items() if isinstance(v, int | float | str) and k != "out"}
    print(json.dumps(headline, indent=2))
    print(f"wrote {summary['out']}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick)
    return 0


def _print_summary(summary: dict) -> None:
    import os

    if os.environ.get("RANK", "0") == "0":  # one summary under torchrun
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in summary["val"].items())
        print(f"validation after {summary['steps']} steps: {metrics}")
        print(f"model: {summary['out']}/model   curves: {summary.get('curves')}")


def _cmd_eval(args: argparse.Namespace) -> int:
    from .eval.report import evaluate_model
    from .sources import load_source

    result = evaluate_model(load_source(args.directory), args.data, args.split, args.batch_size, args.max_batches,
                            out=args.out, task=args.task, data_options=_data_options(args))  # fmt: skip
    metric = "accuracy" if "accuracy" in result else "perplexity"
    params = result["parameters"]
    print(f"{args.data}/{args.split}: {metric} {result[metric]:.4f} on {result['examples']} examples")
    print(f"MACs per sample {result['macs_per_sample'] / 1e6:.2f} M; parameters {params['total'] / 1e6:.2f} M "
          f"total, {params['active'] / 1e6:.2f} M active")  # fmt: skip
    for name, layer in result.get("routing", {}).items():
        print(f"  {name}: entropy {layer['entropy']:.3f}/{layer['max_entropy']:.3f}, dead experts "
              f"{layer['dead_experts']}, dropped pairs {layer['dropped_pairs']:.3f}")  # fmt: skip
    if args.out:
        print(f"wrote {args.out}/eval.json" + (" and expert_load.png" if "expert_load_png" in result else ""))
    return 0


def _registries() -> dict[str, tuple[str, Registry]]:
    """What ``upcycle list`` shows: name -> (heading, registry)."""
    from .data.registry import DATASETS
    from .layers.backends.registry import BACKENDS
    from .layers.routers.base import ROUTERS
    from .methods.bam.merge import MERGE_METHODS
    from .recycling import METHODS

    return {
        "methods": ("recycling methods (upcycle convert --method)", METHODS),
        "merge": ("merge methods: several dense LMs -> one MoE (upcycle.merge, upcycle bam)", MERGE_METHODS),
        "routers": ("routers (--router, recipe router.type)", ROUTERS),
        "router_inits": ("router initialisations (--router-init, recipe router.init)", ROUTER_INITS),
        "backends": ("expert compute backends (--backend)", BACKENDS),
        "formats": ("export formats (upcycle export --format)", EXPORT_FORMATS),
        "datasets": ("datasets (--data)", DATASETS),
    }


LIST_CHOICES = ["all", "methods", "merge", "routers", "router_inits", "backends", "formats", "datasets", "adapters",
                "recipes"]  # fmt: skip


def _cmd_list(args: argparse.Namespace) -> int:
    for what, (heading, registry) in _registries().items():
        if args.what in (what, "all"):
            print(f"{heading}:")
            for entry in registry.entries():
                print(f"  {entry.name:<18} {entry.description}" + (f"  [{entry.paper}]" if entry.paper else ""))
    if args.what in ("adapters", "all"):
        from .adapters import list_adapters

        print("adapters (model families):")
        for adapter in list_adapters():
            print(f"  {adapter['name']:<18} {adapter['family']}")
    if args.what in ("recipes", "all"):
        from .recipes import list_recipes

        print("recipes (upcycle run NAME, or --config / --recipe NAME):")
        for name, path in list_recipes().items():
            home = path.parent.parent.name if "methods" in path.parts else "dense pre-training"
            print(f"  {name:<34} {home}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    if args.rounds and args.name != "layers":
        raise ValueError("--rounds applies to the layers benchmark only")
    module = importlib.import_module(BENCHMARKS[args.name])
    options = {"rounds": args.rounds} if args.rounds else {}
    result = module.run(out=args.out, quick=args.quick, **options)
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {result['json']} and {result['png']}")
    return 0


def _source_flags(parser: argparse.ArgumentParser) -> None:
    """How SOURCE's weights are read; timm:ARCH needs one of a tag, --pretrained, --checkpoint, --random-init."""
    parser.add_argument("--pretrained", action="store_true",
                        help="timm:ARCH with timm's default pretrained weights (through the hub cache)")  # fmt: skip
    parser.add_argument("--checkpoint", help="safetensors state dict for a timm:ARCH source")
    parser.add_argument("--random-init", action="store_true",
                        help="timm:ARCH with random weights (seeded, so verify can rebuild it)")  # fmt: skip
    parser.add_argument(
        "--allow-pickle", action="store_true",
        help="accept pickle checkpoints (.bin/.pt), read with torch.load(weights_only=True)",
    )  # fmt: skip


def _dtype_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help=f"dtype of {what} (default auto: the source's)")  # fmt: skip


def _load_source(args: argparse.Namespace, source: str, dtype: str = "float32"):
    """SOURCE read with the command's source flags."""
    from .sources import load_source

    return load_source(source, checkpoint=args.checkpoint, allow_pickle=args.allow_pickle, pretrained=args.pretrained,
                       random_init=args.random_init, dtype=dtype)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upcycle", description="Turn dense pretrained checkpoints into Mixture-of-Experts models.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"upcycle {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = commands.add_parser(
        "convert", help="convert a dense checkpoint into an MoE and save it",
        description="SOURCE: a Hugging Face model directory, a hub id ORG/NAME[@REVISION], a .gguf file, "
        "timm:ARCH.TAG (pretrained; or timm:ARCH with --pretrained, --checkpoint or --random-init), or a directory "
        "written by upcycle. Prints the max |moe - dense| on random inputs after converting.",
    )  # fmt: skip
    convert.add_argument("source", help="the dense model to convert")
    convert.add_argument("--out", required=True, help="output directory (written atomically)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    convert.add_argument(
        "--stream", action="store_true",
        help="stream tensors from safetensors shards (Llama-family directories larger than RAM)",
    )  # fmt: skip
    convert.add_argument("--export", choices=EXPORT_FORMATS.names(),
                         help="write this export format instead of upcycle's own (with --stream: mixtral)")  # fmt: skip
    convert.add_argument("--layout", choices=["legacy", "fused"], help="mixtral tensor layout (with --export mixtral)")
    convert.add_argument("--no-check", dest="check", action="store_false",
                         help="--stream: do not check each layer against its dense FFN (noisy recipes)")  # fmt: skip
    _source_flags(convert)
    _dtype_flag(convert, "the converted model")
    _add_recipe_flags(convert)
    _preset_flag(convert, "the --method")
    convert.set_defaults(func=_cmd_convert)

    verify = commands.add_parser(
        "verify", help="max |moe - dense| end to end and per converted layer; exit 1 above --atol or --rtol"
    )
    verify.add_argument("directory", help="a directory written by upcycle convert / upcycle.save")
    verify.add_argument("--against", required=True, help="the dense SOURCE to compare with")
    verify.add_argument("--atol", type=float, default=1e-4, help="end-to-end tolerance on the outputs (default 1e-4)")
    verify.add_argument(
        "--rtol", type=float, default=1e-4,
        help="per-layer tolerance: each converted layer's max |moe - dense| / max |dense| on the same input "
        "(default 1e-4, for fp32)",
    )  # fmt: skip
    verify.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    _source_flags(verify)
    verify.set_defaults(func=_cmd_verify)

    export = commands.add_parser("export", help="write a converted model where transformers / timm load it")
    export.add_argument("directory", help="a directory written by upcycle convert / upcycle.save")
    export.add_argument("--format", required=True, choices=["auto", *EXPORT_FORMATS.names()],
                        help="auto: the exact MoE twin of the family, else hf_generic (transformers remote code); "
                             "bam: upcycle's BAM model class (upcycle bam / upcycle.merge output)")  # fmt: skip
    export.add_argument("--out", required=True, help="output directory (written atomically)")
    export.add_argument("--layout", choices=["legacy", "fused"],
                        help="mixtral tensor layout (default fused; legacy for transformers 4, vLLM and llama.cpp's "
                             "convert_hf_to_gguf.py)")  # fmt: skip
    export.add_argument("--arch", choices=GGUF_ARCHES,
                        help="gguf: llama.cpp architecture (default: from the source family)")  # fmt: skip
    export.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    _dtype_flag(export, "the exported weights")
    export.set_defaults(func=_cmd_export)

    train = commands.add_parser(
        "train", help="fine-tune a model (resumable; runs under torchrun for several processes)",
        description="DIRECTORY: a folder written by upcycle (convert / train / pretrain) or any SOURCE.",
    )  # fmt: skip
    train.add_argument("directory", help="the model to train")
    _train_flags(train)
    train.add_argument("--num-labels", type=int, help="a fresh classification head of this many classes")
    train.add_argument("--reset-head", action="store_true",
                       help="a fresh classification head sized from the data's labels (or --num-labels)")  # fmt: skip
    train.set_defaults(func=_cmd_train)

    pretrain = commands.add_parser(
        "pretrain", help="train a dense model from scratch (presets: vit_t, vit_s, convnext_t, lm_tiny, ...)",
        description="ARCH: a preset (vit_t, vit_s, convnext_t, lm_tiny, lm_tiny_parallel) or timm:NAME.",
    )  # fmt: skip
    pretrain.add_argument("arch", help="the architecture to build")
    _train_flags(pretrain, freeze=False)
    pretrain.set_defaults(func=_cmd_pretrain)

    d2dmoe = commands.add_parser(
        "d2dmoe", help="D2DMoE / MoEfication: sparsify, split, fit routers, sweep tau / k (resumable stages)",
        description="SOURCE: a dense model (timm:ARCH, a Hugging Face folder, a folder written by upcycle). Each "
                    "stage writes a folder under --out; a rerun resumes at the first unfinished one.",
    )  # fmt: skip
    _pipeline_flags(d2dmoe, "D2DMoE recipe YAML (its 'd2dmoe' section)",
                    "run folder (stages, sweeps, summary.json, curves.png)",
                    "--set num_experts=32 --set 'taus=[0, 0.5]'")  # fmt: skip
    d2dmoe.set_defaults(func=_cmd_d2dmoe)

    bam = commands.add_parser(
        "bam", help="BAM / BTX: branch a seed LM per domain, mix, train, compare with the dense seed (resumable)",
        description="SOURCE: a dense Llama-style causal LM (a Hugging Face folder, a .gguf file, a folder written by "
                    "upcycle). Each phase writes a folder under --out; a rerun resumes at the first unfinished one. "
                    "Export a mixture with: upcycle export OUT/mix-bam_expert_kv/model --format bam --out DIR",
    )  # fmt: skip
    _pipeline_flags(bam, "BAM recipe YAML (its 'bam' section); default: the built-in recipe",
                    "run folder (phases, summary.json, bam.png)",
                    "--set 'variants=[btx, bam_expert_kv]' --set top_k=2", recipe_required=False)  # fmt: skip
    bam.set_defaults(func=_cmd_bam)

    run = commands.add_parser(
        "run", help="run a whole pipeline from one YAML recipe (a file, or a built-in name: upcycle list recipes)",
        description="RECIPE: a YAML file with a 'run' section (source, optional pretrain / finetune / export) and "
                    "one pipeline section: d2dmoe, bam, or convert (+ train). Reruns resume.",
    )  # fmt: skip
    run.add_argument("recipe", help="e.g. moefication_minilm")
    run.add_argument("--out", help="run folder (default: the recipe's run.out, else runs/<recipe name>)")
    run.add_argument("--redo", action="store_true", help="rebuild stages whose recipe fields changed")
    _preset_flag(run, "the recipe's method")
    run.set_defaults(func=_cmd_run)

    demo = commands.add_parser(
        "demo", help="the main job on real checkpoints (~10 min on 2 cores): SmolLM2 -> MoE -> fine-tune -> "
                     "Mixtral, MiniLM -> D2DMoE curve, a report",
        description="SmolLM2-135M upcycled into an MoE, verified, fine-tuned on Shakespeare, measured, exported to "
                    "Mixtral, reloaded with transformers and sampled; MiniLM-L6 turned into a dynamic-k MoE with a "
                    "compute-vs-accuracy curve; a summary table and OUT/report.md with the plots.",
    )  # fmt: skip
    demo.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    demo.add_argument("--quick", action="store_true", help="a smoke run of every step (seconds of training)")
    demo.set_defaults(func=_cmd_demo)

    evaluation = commands.add_parser("eval", help="held-out metric, MACs, parameters and routing statistics")
    evaluation.add_argument("directory", help="a folder written by upcycle, or any SOURCE")
    _data_flags(evaluation, required=True)
    evaluation.add_argument("--split", default="test", choices=["val", "test"], help="held-out split (default test)")
    evaluation.add_argument("--batch-size", type=int, default=64, help="examples per forward (default 64)")
    evaluation.add_argument("--max-batches", type=int, help="cap, for a quick look")
    evaluation.add_argument("--out", help="folder for eval.json and expert_load.png")
    evaluation.set_defaults(func=_cmd_eval)

    listing = commands.add_parser(
        "list",
        help="list every registry (methods, merge methods, routers, backends, formats, datasets), adapters, recipes",
    )
    listing.add_argument(
        "what",
        nargs="?",
        default="all",
        choices=LIST_CHOICES,
        help="what to list (default all)",
    )
    listing.set_defaults(func=_cmd_list)

    bench = commands.add_parser(
        "bench", help="run a benchmark and write results/<name>.json and PNG plots",
        description="Run a benchmark; results are measured side by side in one process and written atomically.",
    )  # fmt: skip
    bench.add_argument("name", choices=list(BENCHMARKS), help="which benchmark")
    bench.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    bench.add_argument("--out", default="results", help="output folder (default: results)")
    bench.add_argument("--rounds", type=int, default=None, help="timed rounds per case (layers benchmark)")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; exit 0 on success, 2 for bad input, 1 for a failed run, 130 on Ctrl-C.

    Errors are one to three lines on stderr that say what to change; ``--debug`` shows the traceback instead.
    """
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("upcycle: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        message, code = describe_error(error)
        print(f"upcycle: error: {message}", file=sys.stderr)
        return code


def describe_error(error: Exception) -> tuple[str, int]:
    """The message and exit code of an error: bad input (``UserError`` and the library's ``ValueError``, a missing
    or existing path) exits 2; a failure of the machine (a read-only folder, a full disk) or of the run exits 1."""
    if isinstance(error, UserError):
        return str(error), error.exit_code
    if isinstance(error, ValueError | FileExistsError | FileNotFoundError):
        return str(error), 2
    if isinstance(error, OSError):
        where = f" ({error.filename})" if error.filename else ""
        reason = error.strerror or str(error)
        hint = {errno.ENOSPC: "free some space or choose another output directory",
                errno.EACCES: "choose an output directory you can write to",
                errno.EROFS: "choose an output directory on a writable file system"}.get(error.errno, "")  # fmt: skip
        return f"{reason}{where}" + (f"; {hint}" if hint else ""), 1
    lines = str(error).strip().splitlines()[:3] or [""]
    return f"{type(error).__name__}: " + "\n".join(lines) + "\n(rerun with --debug for the traceback)", 1


if __name__ == "__main__":
    sys.exit(main())
