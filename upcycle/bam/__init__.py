"""BAM (Branch-Attend-Mix, arXiv 2408.08274) and BTX (arXiv 2403.07816) end to end: branch a seed LM per domain,
mix the branches with ``upcycle.merge``, train the mixture, and compare with the seed continued densely."""

from .pipeline import evaluate_models, run_bam, run_stages
from .recipe import BAMRecipe, load_recipe

__all__ = ["BAMRecipe", "evaluate_models", "load_recipe", "run_bam", "run_stages"]
