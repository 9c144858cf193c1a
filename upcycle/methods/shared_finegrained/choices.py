"""Shared + fine-grained experts' decisions: the paper's value (Qwen1.5-MoE's upcycling as its report describes it,
with DeepSeekMoE's layout, arXiv 2401.06066), the released code's, ours (upcycle.presets; the table in
docs/methods/shared_finegrained.md). Neither released its conversion code (only the finished models and their
modelling code), so the released column reads the published Qwen1.5-MoE-A2.7B config where it says something, and
the ``released`` preset sets nothing else."""

from ...presets import METHOD_CHOICES, NOT_STATED, Choice

CHOICES = (
    Choice("routed experts start as", "segments of the dense FFN, replicated, with added randomness", NOT_STATED,
           "segments of the dense FFN, replicated exactly", why="exact copies keep the dense model at step 0"),
    Choice("segments per copy (S)", 8, NOT_STATED, 4, field="convert.options.segments",
           why="the report partitions each FFN into 8 segments; 4 keeps our small recipes' experts wide enough"),
    Choice("noise on the routed copies (relative std)", NOT_STATED, NOT_STATED, 0.0, field="convert.options.noise_std",
           why="the report adds randomness without saying how much; noise is an option"),
    Choice("gate on the always-on shared expert", "sigmoid", "sigmoid", "none", field="convert.options.shared_gate",
           why="ungated exports to DeepSeek-V3, GLM4-MoE and GraniteMoeShared; sigmoid (Qwen2-MoE's) is one switch"),
    Choice("shared expert's share of the dense FFN", NOT_STATED, NOT_STATED, 0.25,
           field="convert.options.shared_fraction",
           why="Qwen1.5-MoE's shared expert is 4 routed experts wide and was not carved from the dense FFN; a "
               "quarter is DeepSeekMoE's one shared expert among four active fine-grained ones"),
    Choice("which dense units are shared", NOT_STATED, NOT_STATED, "weight_norm",
           field="convert.options.shared_units",
           why="the largest weight-norm products, a data-free importance proxy; first is the plain partition"),
    Choice("router rows tied inside each copy", NOT_STATED, NOT_STATED, True,
           why="not offered: untied rows lose dense equivalence at step 0 (granular upcycling's virtual groups)"),
    Choice("experts per token (top-k)", 4, 4, "S (one whole copy)", why="not a preset switch: exactness needs a "
           "multiple of S; Qwen1.5-MoE-A2.7B routes 4 of 60 (its config's num_experts_per_tok)"),
    Choice("top-k weights renormalised to sum 1", NOT_STATED, False, True, field="convert.router.renormalize",
           why="renormalised top-k keeps the dense model exactly; Qwen1.5-MoE's config has norm_topk_prob false"),
)  # fmt: skip

METHOD_CHOICES.add("shared_finegrained", CHOICES, description="Shared + fine-grained experts: paper / released / ours")
