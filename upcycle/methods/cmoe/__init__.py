"""CMoE (Pei et al., arXiv 2502.04416): training-free carving of a dense FFN into always-on shared experts and
routed experts from activation statistics on a few calibration tokens, under an analytic router; usable without
training and fine-tunable after.

The carving plan (activation markers, rates, shared units, balanced k-means, representatives) is :mod:`.carving`;
the router :mod:`.router`; the method and its calibration :mod:`.recycling`; its decisions :mod:`.choices`; its
recipe ``cmoe_smollm2`` (in recipes/); docs/methods/cmoe.md explains it.
"""
