"""Sparse upcycling's decisions (Komatsuzaki et al., arXiv 2212.05055; its granular variant, He et al., arXiv
2410.07524): the paper's value, the released code's, ours (upcycle.presets; the table in
docs/methods/sparse_upcycling.md). Neither paper's upcycling code is public, so the released column is empty and the
``released`` preset sets nothing."""

from ...presets import METHOD_CHOICES, NOT_STATED, Choice

NO_CODE = NOT_STATED  # no released upcycling code to read

CHOICES = (
    Choice("experts start as", "exact copies of the dense MLP", NO_CODE, "exact copies of the dense FFN",
           why="the method itself"),
    Choice("noise on the copies (relative std)", 0.0, NO_CODE, 0.0, field="convert.options.noise_std",
           why="copies stay exact, so the MoE starts as the dense model; noise is an option"),
    Choice("which MLPs become MoE", "every_other", NO_CODE, "all", field="convert.layers",
           why="our recipes upcycle every FFN of small models; the paper's half is one flag away"),
    Choice("experts per MoE layer", 32, NO_CODE, "8 (recipes: 4)",
           why="not a preset switch: 32 copies of every FFN do not fit the CPU budgets our recipes target"),
    Choice("decoder routing: token-choice top-k, k", 2, NO_CODE, 2, field="convert.top_k", why="as the paper"),
    Choice("encoder / vision routing", "expert choice, capacity factor 2", NO_CODE, "token choice",
           why="not offered: expert choice is not causal and no export format expresses it"),
    Choice("top-k weights renormalised to sum 1", NOT_STATED, NO_CODE, True, field="convert.router.renormalize",
           why="renormalised top-k keeps the dense model exactly at step 0"),
    Choice("router initialisation", "new, random", NO_CODE, "normal, std 0.02",
           why="any small random init starts from the dense model when top-k is renormalised"),
    Choice("granular: weight scaling of the shards", "paper", NO_CODE, "auto", field="convert.options.weight_scaling",
           why="auto is exact for every activation; the paper's cube-root spread is exact for squared ReLU only"),
)  # fmt: skip

METHOD_CHOICES.add("sparse_upcycling", CHOICES, description="Sparse upcycling: paper / ours")
