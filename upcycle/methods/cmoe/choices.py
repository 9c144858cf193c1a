"""CMoE's decisions (Pei et al., arXiv 2502.04416): the paper's value, the released code's (github.com/JarvisPei/CMoE:
CMoE_utils.py's carving and router construction, CMoE_model.py's router, run_cmoe.py's defaults), ours
(upcycle.presets; the table in docs/methods/cmoe.md)."""

from ...presets import METHOD_CHOICES, NOT_STATED, Choice

CHOICES = (
    Choice("shared experts", "the N_s·m units with the highest activation rates", "the N_s·m highest rates",
           "the N_s·m highest rates, plus the h mod N remainder units", why="the released code drops the remainder "
           "units when N does not divide h; in the shared expert they keep the layer exact"),
    Choice("shared experts N_s", 2, 2, 2, field="convert.options.shared_experts", why="S2A2E16, the main setting"),
    Choice("activation marker K_a", NOT_STATED, 10, 10, field="convert.options.activation_top_k",
           why="the released default (run_cmoe.py --k-act)"),
    Choice("activations measured on (raw: h = act(W_gate x) ⊙ (W_up x); cosine: on L2-normalised x and rows)",
           "raw", "cosine", "raw", field="convert.options.statistic",
           why="the activation the FFN computes, as the paper writes it; cosine reproduces the released code"),
    Choice("k-means distance", NOT_STATED, "l1", "l1", field="convert.options.distance",
           why="as the released code (on 0/1 marker vectors L1 and squared L2 to a 0/1 point agree)"),
    Choice("balanced k-means steps", NOT_STATED, 1, 10, field="convert.options.kmeans_iterations",
           why="a few steps, stopping early once stable; the released code assigns once from the seed centroids"),
    Choice("equal-size assignment (linear: exact linear assignment)", "linear", "linear", "linear",
           field="convert.options.assignment",
           why="scipy's exact linear assignment (the cmoe extra); greedy without scipy or for very wide FFNs"),
    Choice("router rows: the representative units' W_up / W_gate rows (raw) or L2-normalised", "raw", "normalized",
           "raw", field="convert.options.router_rows",
           why="a router score is then exactly the representative unit's activation"),
    Choice("router scores", "softmax(|a(x)|); weights 1 + s·u, u = 0", "softmax(|a(x)|); weights 1 + s·u, u = 0",
           "softmax(|a(x)|); weights 1 + s·u, u = 0", why="the analytic router itself: weights 1 keep the FFN's sum"),
    Choice("load-balancing bias step γ", 0.001, 0.001, 0.001, field="convert.options.bias_update_rate",
           why="aux-loss-free balancing, updated in training only"),
    Choice("calibration", "a small calibration set (WikiText-2)", "8 × 2048 WikiText-2 tokens, layer by layer on "
           "the outputs of the layers already carved", "64 × 128 tokens of the train split, every layer on the dense "
           "model", why="not a switch: one pass through the dense model calibrates every layer at once"),
    Choice("fine-tuning after carving", "LoRA on the attention and FFN projections + the router scale", "LoRA r 8 + "
           "the router scale (lr 1e-3)", "optional: upcycle train (full fine-tuning)", why="not a switch: training "
           "is upcycle train's; the carved model is usable without it"),
)  # fmt: skip

METHOD_CHOICES.add("cmoe", CHOICES, description="CMoE: paper / released / ours")
