"""Each paper's method in one home; what all share (layers, adapters, train, eval, export, data) stays outside.

    sparse_upcycling/   sparse upcycling (arXiv 2212.05055): copies, noise, granular shards; its recipe
    jetpack/            MoE Jetpack (arXiv 2406.04801): checkpoint recycling (calibration, sampling), SpheroMoE,
                        recipes, plots, benchmark
    d2dmoe/             D2DMoE (arXiv 2310.04361) and MoEfication (arXiv 2110.01786): neuron split, ReLU and
                        sparsity stages, attention distillation, dynamic-k and MoEfication routers, the resumable
                        pipeline, sweeps, recipes, plots, benchmark
    drop_upcycling/     Drop-Upcycling (arXiv 2502.19261): sparse upcycling's copies with a random share of every
                        expert's hidden units redrawn from the dense statistics; its recipe
    shared_finegrained/ shared + fine-grained experts (DeepSeekMoE, arXiv 2401.06066; upcycled as Qwen1.5-MoE): an
                        always-on shared expert and fine-grained routed segments carved from the dense FFN; its recipe
    cmoe/               CMoE (arXiv 2502.04416): training-free carving into shared experts and routed experts from
                        activation statistics under an analytic router; its recipe
    bam/                BAM (arXiv 2408.08274) and BTX (arXiv 2403.07816): merging dense branches into one MoE, the
                        branch / mix / dense-reference pipeline, evaluation, recipes, plots, benchmark

Importing this package registers every method's recycling functions and routers; pipelines, plots and benchmarks
load on first use.
"""

from .bam import merge  # noqa: F401  (registration side effect)
from .cmoe import choices as _cmoe_choices  # noqa: F401
from .cmoe import recycling as _cmoe_recycling  # noqa: F401
from .d2dmoe import dynamic_k_router, moefication_router, split  # noqa: F401
from .d2dmoe import recycling as _d2dmoe_recycling  # noqa: F401
from .drop_upcycling import choices as _drop_upcycling_choices  # noqa: F401
from .drop_upcycling import recycling as _drop_upcycling_recycling  # noqa: F401
from .jetpack import recycling as _jetpack_recycling  # noqa: F401
from .jetpack import sphero  # noqa: F401
from .shared_finegrained import choices as _shared_finegrained_choices  # noqa: F401
from .shared_finegrained import recycling as _shared_finegrained_recycling  # noqa: F401
from .sparse_upcycling import choices as _sparse_upcycling_choices  # noqa: F401
from .sparse_upcycling import recycling as _sparse_upcycling_recycling  # noqa: F401
