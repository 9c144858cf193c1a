"""D2DMoE (Szatkowski et al., arXiv 2310.04361) and its MoEfication baseline (Zhang et al., arXiv 2110.01786),
point by point: the papers, the authors' released code (github.com/bartwojcik/D2DMoE; MoEfication's own
github.com/thunlp/MoEfication where it says so), ours. Fields are paths into a whole ``upcycle run`` recipe
(``d2dmoe_vit_fashion_mnist``); values are in our convention (τ: 0 runs every expert, the authors store 1 − τ).
MoEfication's points start with "MoEfication: ".
"""

from __future__ import annotations

from ...presets import METHOD_CHOICES, NOT_STATED, Choice
from .recipe import TAUS

# the authors' ViT-B sweep (scripts/d2dmoe_vit.py, dsti_tau_to_eval 0.5 ... 1.0) as 1 − τ
RELEASED_TAUS = [0.0, 0.0001, 0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35,
                     0.4, 0.5]  # fmt: skip

# fmt: off
CHOICES: tuple[Choice, ...] = (
    # ---- stage 1: activation sparsity ----------------------------------------------------------------------------
    Choice(
        "Sparsity penalty on the FFN activations (ViT; BERT and GPT-2 use L1)",
        "hoyer", "hoyer", "hoyer", field="d2dmoe.sparsify.aux.sparsity_kind",
        why="The squared Hoyer measure is scale-free, so one weight suits every layer; L1 stays available.",
    ),
    Choice(
        "Sparsity weight α (ViT-B 0.2 Hoyer; BERT 1e-4 L1; GPT-2 5e-4 L1)",
        0.2, 0.2, 0.01, field="d2dmoe.sparsify.aux.sparsity",
        why="Our ViT fine-tunes for one epoch instead of 90; 0.2 there costs accuracy the short run cannot recover.",
    ),
    Choice(
        "Sparsity weight ramp: share of training over which α grows linearly from 0 (BERT: none, α constant)",
        0.5, 0.5, 0.5, field="d2dmoe.sparsify.aux.sparsity_ramp",
        why="As the authors' ViT runs (their 'linear_warmup' schedule).",
    ),
    Choice(
        "How the penalty averages over layers when attention-projection MLPs are sparsified too",
        NOT_STATED, "per_group", "per_group", field="d2dmoe.sparsify.aux.sparsity_mean",
        why="Fixed: one mean over FFNs and projections gave each FFN a fifth of its weight; now the FFN mean and the "
        "projection mean are added, as in sparse_finetuning.py ('pooled' keeps the old mean).",
    ),
    Choice(
        "L1 penalty scale: per token, summed over the hidden units, averaged over tokens",
        "sum over units", "sum over units", "sum over units",
        why="Fixed: we averaged over the units too, which made the authors' L1 weights h times weaker.",
    ),
    Choice(
        "Sparsity fine-tuning length and optimiser (ViT-B: 90 epochs, batch 512, lr 2e-5, weight decay 0.05)",
        NOT_STATED, "90 epochs, lr 2e-5", "1 epoch, lr 2e-4 (ViT)",
        why="Compute: our benchmark runs on CPUs; a shorter run with a larger learning rate.",
    ),
    # ---- stage 2: experts ----------------------------------------------------------------------------------------
    Choice(
        "Expert construction: balanced k-means on the L2-normalised rows of W1 (gated FFNs: the gate rows)",
        "balanced k-means", "KMeansConstrained (Euclidean on normalised rows)", "spherical balanced k-means",
        why="On unit rows Euclidean and cosine distance order points alike; our own balanced assignment needs no "
        "extra dependency.",
    ),
    Choice(
        "Experts per FFN (ViT-B: 512 experts of 6 units for FLOPs, 24 of 128 for wall-clock; BERT-base: 128 of 24)",
        NOT_STATED, "expert size 6 (ViT-B)", "16 experts of 32 units (ViT FFN 512)",
        why="Scale: our FFNs are 512 wide and run on CPU, where tiny experts cost more in overhead than they save.",
    ),
    Choice(
        "W2's bias: one shared bias added once per token, not split among experts",
        "shared", "shared", "shared",
        why="With every expert on, the layer then equals the dense FFN exactly (tested).",
    ),
    # ---- stage 3: routers ----------------------------------------------------------------------------------------
    Choice(
        "Router MLP width: d -> 128 -> E, ReLU, no bias",
        128, 128, 32, field="d2dmoe.router_hidden",
        why="At our d 128, a width of d/4 keeps the paper's router-to-FFN cost ratio; 128 would cost 4x that.",
    ),
    Choice(
        "Router output: abs, so the prediction is a norm",
        "abs", "abs", "abs",
        why="As in the paper.",
    ),
    Choice(
        "Router regression target: L2 norm of each expert's output, MSE loss",
        "L2 norm, MSE", "L2 norm, MSE", "L2 norm, MSE",
        why="As in the paper.",
    ),
    Choice(
        "Router fitting: backbone frozen and in eval mode, every expert executing",
        NOT_STATED, "eval mode", "eval mode",
        why="Fixed: the backbone ran in training mode, so dropout was on while routers learned (MiniLM, BERT, "
        "GPT-2); now only the routers are in training mode.",
    ),
    Choice(
        "Router learning rate (Adam, no weight decay)",
        0.001, 0.001, 0.001, field="d2dmoe.routers.lr",
        why="As in the paper.",
    ),
    Choice(
        "Router training length (ViT-B: 7 epochs, batch 128; BERT: 10 epochs)",
        "a few epochs", "7 epochs (ViT-B)", "0.5 epoch (ViT), 80 steps (MiniLM)",
        why="Compute: the router loss levels off within half an epoch on Fashion-MNIST.",
    ),
    # ---- stage 4: dynamic-k inference and the sweep --------------------------------------------------------------
    Choice(
        "Dynamic-k rule: expert i runs iff r_i >= τ · max_j r_j",
        "τ · max", "(1 - τ) · max ('dynk_max')", "τ · max, τ in [0, 1]",
        why="Same rule; our τ = 0 runs every expert and larger τ runs fewer (the authors store 1 - τ).",
    ),
    Choice(
        "A token whose router predicts 0 for every expert runs all of them at τ > 0 (r_i >= τ · 0 admits every "
        "expert; otherwise none runs)",
        NOT_STATED, True, False, field="d2dmoe.zero_runs_all",
        why="A ReLU router without bias outputs exactly 0 where the sparsity stage silenced an FFN for a token; "
        "running all 16 experts there made one ViT layer dense for 79-87 % of tokens at α 0.05-0.2.",
    ),
    Choice(
        "τ grid of the sweep (ours: dense below 0.05, where most of the cost falls)",
        NOT_STATED, RELEASED_TAUS, TAUS, field="d2dmoe.taus",
        why="Fixed: our grid had no point between 0 and 0.05; it now has seven, and keeps points up to 1.",
    ),
    Choice(
        "Sweep: each point's accuracy and cost are measured after its τ (or k) is set",
        "after", "after", "after",
        why="Checked, not a bug: sweep.py sets the point first; a test on a real model pins it.",
    ),
    Choice(
        "Held-out examples behind each accuracy",
        "full test split", "full test split", ">= 1,000 per split (ViT 5,000; MiniLM 1,536)",
        why="Enough that one point of accuracy is ten examples or more, at CPU cost.",
    ),
    # ---- attention projections (§3.4) ----------------------------------------------------------------------------
    Choice(
        "Attention projections Q, K, V, O -> two-layer ReLU MLPs of equal cost (hidden width as a share of it)",
        0.5, 0.5, 0.5, field="d2dmoe.attention.hidden_ratio",
        why="Equal cost, as in the paper (the authors' flops_factor 1.0).",
    ),
    Choice(
        "Projection distillation loss and length (authors: plain MSE, Hoyer 1e-3 ramped, dropout 0.05, 3 epochs)",
        "MSE + Hoyer", "MSE + 1e-3 Hoyer, 3 epochs", "MSE / target energy + 0.01 Hoyer / h, 400 steps",
        why="Both terms normalised so one weight fits every module and width; steps sized for CPU.",
    ),
    # ---- MoEfication -------------------------------------------------------------------------------------------
    Choice(
        "MoEfication: router hidden activation",
        "tanh", "tanh", "tanh", field="d2dmoe.moefication_activation",
        why="As MoEfication's code and D2DMoE's baseline; 'relu' gives it D2DMoE's router MLP instead.",
    ),
    Choice(
        "MoEfication: BCE targets are expert activation sums divided by the largest sum of the batch, not the token",
        "batch_max", "batch_max", "batch_max", field="d2dmoe.moefication_targets",
        why="Was per token; now as both released codes divide ('token_max' keeps the per-token scale).",
    ),
    Choice(
        "MoEfication: router shape (its own code: d -> E -> E, tanh, initialised from the cluster centres and the "
        "identity, inputs L2-normalised)",
        "two-layer MLP", "d -> 128 -> E (D2DMoE's baseline)", "d -> router_hidden -> E",
        why="As D2DMoE's baseline, so both methods get the same router size; the centre initialisation is not "
        "offered.",
    ),
    Choice(
        "MoEfication: inference runs a fixed top-k of unweighted experts, k swept over powers of two up to E",
        "top-k", "top-k", "top-k",
        why="As in the paper.",
    ),
)
# fmt: on

METHOD_CHOICES.add(
    "d2dmoe", CHOICES, description="D2DMoE (arXiv 2310.04361) and its MoEfication baseline (arXiv 2110.01786)"
)
