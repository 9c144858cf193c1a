"""Drop-Upcycling (Nakamura et al., ICLR 2025, arXiv 2502.19261): sparse upcycling's copies of the dense FFN, then
each expert re-initialises its own random share r of the hidden units from the dense matrices' statistics, so the
experts start different and specialise sooner.

The method is :mod:`.recycling` (built on sparse upcycling's copies); its decisions are :mod:`.choices`; its recipe
``drop_upcycling_smollm2`` (in recipes/); docs/methods/drop_upcycling.md explains it.
"""
