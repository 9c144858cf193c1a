"""Sparse upcycling (Komatsuzaki et al., arXiv 2212.05055): every expert starts as a copy of the dense FFN (with
optional noise, or granular shards of it), so with renormalised top-k the MoE computes what the dense model did.

The method is :mod:`.recycling`; its recipe ``sparse_upcycling_smollm2`` (in recipes/); docs/methods/sparse_upcycling.md
explains it.
"""
