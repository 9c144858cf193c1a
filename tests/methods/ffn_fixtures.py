"""A small dense FFN with random weights of every kind (gated or plain, with or without biases), for the recycling
methods' tests that carve or copy one FFN."""

import torch

from upcycle.adapters.dense_ffn import DenseFFN

D, H = 16, 40


def random_dense_ffn(gated: bool = True, biased: bool = True, seed: int = 0, d: int = D, h: int = H) -> DenseFFN:
    g = torch.Generator().manual_seed(seed)
    return DenseFFN(w_up=torch.randn(h, d, generator=g), w_down=torch.randn(d, h, generator=g), activation="silu",
                    w_gate=torch.randn(h, d, generator=g) if gated else None,
                    b_up=torch.randn(h, generator=g) if biased else None,
                    b_gate=torch.randn(h, generator=g) if biased and gated else None,
                    b_down=torch.randn(d, generator=g) if biased else None)  # fmt: skip
