"""BAM's decisions (Zhang et al., arXiv 2408.08274) and its BTX baseline's (Sukhbaatar et al., arXiv 2403.07816),
point by point: the papers, the authors' released code, ours (docs/methods/bam.md shows the table).

Neither paper links code, and no repository of the authors' was found: the released column is "not stated" in
every row, so ``--preset released`` sets nothing. BTX's points start with "BTX: " and give the BTX paper's own
values, which differ from BAM's BTX baseline (top-2 with the weights renormalised there, top-1 raw here).
Fields are dotted paths into a whole ``upcycle run`` recipe (``bam.top_k``, ``bam.mix.aux.z_loss``).
"""

from __future__ import annotations

from ...presets import METHOD_CHOICES, NOT_STATED, Choice

CHOICES: tuple[Choice, ...] = (
    Choice(
        "Block layout: parallel attention (attention and FFN read one normalised input, both added to the residual)",
        "parallel",
        NOT_STATED,
        "the seed's layout (parallel in the benchmark's byte-level seed; SmolLM2 is sequential)",
        why="A trained sequential seed cannot become parallel without retraining, so the mixture keeps the seed's "
        "layout; both are supported.",
    ),
    Choice(
        "The seed is one of the experts (N domain branches + the seed = N+1 experts)",
        True,
        NOT_STATED,
        True,
        why="Same as the paper: the seed keeps the general text it was trained on as an expert.",
    ),
    Choice(
        "FFN router: experts per token",
        1,
        NOT_STATED,
        1,
        field="bam.top_k",
        why="Top-1 as in the paper; top-k is an option.",
    ),
    Choice(
        "FFN router: divide the chosen experts' probabilities by their sum",
        False,
        NOT_STATED,
        False,
        field="bam.renormalize",
        why="The chosen expert is weighted by its raw softmax probability, as in the paper (Switch style). On "
        "SmolLM2 it shrinks every FFN to a quarter at the merge (validation perplexity ~500,000): its benchmark "
        "recipe routes top-2 renormalised.",
    ),
    Choice(
        "Attention router: soft, every token uses every attention expert weighted by softmax(W_a x)",
        "soft (hard top-1 / top-2 routing was tried and did not beat BTX)",
        NOT_STATED,
        "soft",
        why="Same as the paper; hard attention routing is not offered.",
    ),
    Choice(
        "Attention experts: each keeps Q, K, V, O (expert KV) or shares averaged K, V (shared KV)",
        ["btx", "bam_expert_kv", "bam_shared_kv"],
        NOT_STATED,
        ["btx", "bam_expert_kv", "bam_shared_kv"],
        field="bam.variants",
        why="Both BAM variants run beside BTX, as in the paper's tables.",
    ),
    Choice(
        "Embeddings, norms and LM head: the average of the N+1 input models",
        "averaged",
        NOT_STATED,
        "uniform average over the seed and the branches",
        why="Same as the paper; the seed counts as one of the averaged models.",
    ),
    Choice(
        "Routers start random: std of the initial router weights",
        NOT_STATED,
        NOT_STATED,
        0.02,
        field="bam.router_init_std",
        why="The paper says random without a scale; 0.02 is the usual Transformer init.",
    ),
    Choice(
        "Router losses: load balancing and z-loss on the FFN routers only, none on the attention router",
        "FFN routers only",
        NOT_STATED,
        "FFN routers only",
        why="Same as the paper: every attention expert runs for every token, so there is nothing to balance.",
    ),
    Choice(
        "Load-balancing weight α (Switch, e·Σ f_i·P_i)",
        NOT_STATED,
        NOT_STATED,
        0.01,
        field="bam.mix.aux.load_balancing",
        why="We could not confirm the paper's value; 0.01 is Switch's and BTX's, so the preset leaves it.",
    ),
    Choice(
        "Router z-loss weight β",
        NOT_STATED,
        NOT_STATED,
        0.001,
        field="bam.mix.aux.z_loss",
        why="We could not confirm the paper's value; 0.001 is ST-MoE's, so the preset leaves it.",
    ),
    Choice(
        "Branch data: each branch's domain mixed with 10% general text",
        0.1,
        NOT_STATED,
        0.1,
        field="bam.general_share",
        why="There is no general corpus offline: the 10% comes from the other domains in equal parts.",
    ),
    Choice(
        "Mix-phase data: equal shares of the domains and general text (25% each of law, math, code, general)",
        "25% each, general text included",
        NOT_STATED,
        "the N domains in equal shares",
        why="No general corpus offline; the seed's pre-training mixture plays that part before branching.",
    ),
    Choice(
        "Learning rates of the branch and mix phases",
        "set for 590M–2B seeds and billions of tokens",
        NOT_STATED,
        "benchmark: branch 1e-3, mix 5e-4 (half the branch rate), 5% warmup, cosine decay",
        why="Absolute rates do not transfer to our seeds; the mix phase uses half the branch rate because it starts "
        "from trained experts with new routers.",
    ),
    Choice(
        "Length of the branch and mix phases",
        "billions of tokens per phase",
        NOT_STATED,
        "benchmark: 600 steps per branch, 500 mix steps (16×128 tokens a step)",
        why="Sized to the CPU budget; the compute-matched dense references make the comparison fair in steps.",
    ),
    Choice(
        "Compute-matched comparison: BAM's mix phase shortened to BTX's mix-phase FLOPs",
        True,
        NOT_STATED,
        True,
        field="bam.compute_matched",
        why="The paper reports BAM at equal data and at equal compute; the benchmark runs both (models *_cm).",
    ),
    Choice(
        "Dense references: the seed continued on the mixture with the same FLOPs and with the same tokens",
        "no dense reference in BAM (BTX compares with a compute-matched dense model)",
        NOT_STATED,
        "both, FLOPs-matched to BAM expert KV (branch phase included) and token-matched",
        why="Our addition: a mixture is only worth its cost if it beats the dense model given the same budget.",
    ),
    Choice(
        "BTX: everything but the FFNs (attention, embeddings, norms, head) averaged over the input models",
        "averaged",
        NOT_STATED,
        "averaged",
        why="Same as the BTX paper; BAM differs only in keeping the attention as experts.",
    ),
    Choice(
        "BTX: the seed is one of the experts",
        True,
        NOT_STATED,
        True,
        why="Same as the BTX paper, where the seed joins the domain experts.",
    ),
    Choice(
        "BTX: FFN experts per token",
        2,
        NOT_STATED,
        None,
        field="bam.btx_top_k",
        why="null follows top_k (1), as BAM's own BTX baseline does; the BTX paper routes top-2.",
    ),
    Choice(
        "BTX: router weights are a softmax over the chosen experts' logits (SoftMax(TopK(W x)))",
        True,
        NOT_STATED,
        None,
        field="bam.btx_renormalize",
        why="null follows renormalize (false), as BAM's BTX baseline; the BTX paper renormalises over the top-k.",
    ),
    Choice(
        "BTX: load-balancing weight α in the MoE fine-tuning",
        0.01,
        NOT_STATED,
        0.01,
        why="One mix recipe serves every variant, so BTX shares bam.mix.aux.load_balancing (same value).",
    ),
    Choice(
        "BTX: MoE fine-tuning data",
        "the union of the experts' training data",
        NOT_STATED,
        "the N domains in equal shares",
        why="BTX and BAM mixtures train on the same mix-phase data here, so the comparison isolates the method.",
    ),
)

METHOD_CHOICES.add(
    "bam", CHOICES,
    description="BAM (arXiv 2408.08274) with its BTX baseline (arXiv 2403.07816); neither paper released code, so the "
    "released preset sets nothing",
)  # fmt: skip
