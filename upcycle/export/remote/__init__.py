"""The remote-code files the ``hf_generic`` export copies next to the weights: standalone (torch and transformers
only, no upcycle import), so ``from_pretrained(dir, trust_remote_code=True)`` works wherever transformers does."""
