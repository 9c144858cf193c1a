"""Shared + fine-grained experts at conversion (DeepSeekMoE, arXiv 2401.06066; upcycled as Qwen1.5-MoE): part of
the dense FFN becomes an always-on shared expert, the rest fine-grained routed experts, exact at conversion.

The method is :mod:`.recycling`; its decisions are :mod:`.choices`; its recipe ``shared_finegrained_smollm2`` (in
recipes/); docs/methods/shared_finegrained.md explains it.
"""
