"""Drop-Upcycling's decisions (Nakamura et al., arXiv 2502.19261): the paper's value, the released code's
(github.com/Taishi-N324/Drop-Upcycling: conversions/drop_upcycling.py, the Mixtral configs in conversions/configs/
and the training scripts), ours (upcycle.presets; the table in docs/methods/drop_upcycling.md)."""

from ...presets import METHOD_CHOICES, NOT_STATED, Choice

CHOICES = (
    Choice("experts start as", "dense FFN copies, each with a share r of its hidden units redrawn",
           "dense FFN copies, each with a share r of its hidden units redrawn",
           "dense FFN copies, each with a share r of its hidden units redrawn", why="the method itself"),
    Choice("drop ratio r (units redrawn per expert: ⌊r·h⌋)", 0.5, 0.5, 0.5, field="convert.options.drop_ratio",
           why="the paper's best; r = 0 is sparse upcycling, r = 1 a from-scratch MoE with the dense statistics"),
    Choice("redrawn units: one set for W_gate, W_up, W_down", "shared", "per_matrix", "shared",
           field="convert.options.index_sets",
           why="one set redraws whole units as the paper describes; per_matrix reproduces the released script"),
    Choice("mean / std of the new weights taken over", "matrix", "dropped", "matrix",
           field="convert.options.statistics",
           why="the paper's whole-matrix statistics; the released script measures only the replaced rows / columns"),
    Choice("each expert's hidden units permuted", NOT_STATED, True, False,
           why="not offered: permuting hidden units computes the same function"),
    Choice("biases of redrawn units (b_up, b_gate)", NOT_STATED, NOT_STATED,
           "drawn from the dense bias vector's mean / std; b_down copied",
           why="their models have no FFN biases; a redrawn unit is new as a whole, b_down belongs to no unit"),
    Choice("router initialisation", NOT_STATED, "uniform, centred, std 0.02", "normal, std 0.02",
           why="not offered: both are small zero-mean draws of the same std"),
    Choice("which MLPs become MoE", "all", "all", "all", field="convert.layers", why="every FFN, as in Mixtral"),
    Choice("experts per MoE layer", 8, 8, "8 (recipes: 4)",
           why="not a preset switch: 8 copies of every SmolLM2 FFN do not fit the CPU budgets our recipes target"),
    Choice("token-choice top-k, k", 2, 2, 2, field="convert.top_k", why="as the paper"),
    Choice("top-k weights renormalised to sum 1", NOT_STATED, True, True, field="convert.router.renormalize",
           why="Mixtral's routing, which their models use"),
    Choice("load-balancing loss coefficient", NOT_STATED, 0.02, 0.01, field="train.aux.load_balancing",
           why="our training default; the released Mixtral configs set 0.02"),
    Choice("router z-loss coefficient", NOT_STATED, 0.0, 0.001, field="train.aux.z_loss",
           why="our training default; the released training (Mixtral in transformers) has no z-loss"),
)  # fmt: skip

METHOD_CHOICES.add("drop_upcycling", CHOICES, description="Drop-Upcycling: paper / released code / ours")
