"""BAM (Branch-Attend-Mix, arXiv 2408.08274) and BTX (arXiv 2403.07816) end to end: branch a seed LM per domain,
mix the branches with ``upcycle.merge`` (:mod:`.merge`), train the mixture, and compare with the seed continued densely
(:mod:`.pipeline`, :mod:`.evaluate`; CLI ``upcycle bam``). Its benchmark is :mod:`.bench`, its recipes ``recipes/``."""

from importlib import import_module

from . import choices  # noqa: F401  (registers the paper / released presets)

# the pipeline trains and evaluates: it loads on first use, so registering the merge methods stays light
_LAZY = {"BAMRecipe": "recipe", "load_recipe": "recipe", "evaluate_models": "pipeline", "run_bam": "pipeline",
         "run_stages": "pipeline"}  # fmt: skip


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BAMRecipe", "evaluate_models", "load_recipe", "run_bam", "run_stages"]
