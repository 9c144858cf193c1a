"""MoE Jetpack (Zhu et al., arXiv 2406.04801): experts recycled from a dense checkpoint's FFN units, chosen by
their activation statistics on calibration images, behind the SpheroMoE router.

    recycling.py   checkpoint recycling as a registered method (``jetpack``), from a wider predecessor or the model
    calibration.py activation statistics (importance, co-activation) on calibration data
    sampling.py    importance / co-activation graph (METIS) / uniform / random unit selection
    sphero.py      the SpheroMoE router; its dual-path core / universal experts are ``upcycle.layers.DualPathExperts``
    bench.py       the benchmark (``upcycle bench jetpack``); plots.py its figures; recipes/ its recipes
    choices.py     paper / released code / ours, point by point (``--preset paper`` / ``released``)
"""

from . import choices  # noqa: F401  (registers the paper / released presets)
