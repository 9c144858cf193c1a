"""``upcycle.verify``: the maximum absolute difference between a converted model's outputs and the dense model's.

Outputs are logits (classifiers, causal LMs) or the last hidden state (encoders), in fp32, eval mode. A method
that claims dense equivalence (copies with renormalised top-k, a neuron split with all experts active) must give
~1e-5 here.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import find_adapter, get_adapter


@torch.no_grad()
def verify(moe_model: nn.Module, dense_model: nn.Module, inputs: dict | torch.Tensor | None = None,
           seed: int = 0) -> float:  # fmt: skip
    """Max |moe(x) - dense(x)| over ``inputs`` (a dict of model inputs or an image batch); random inputs if None."""
    record = getattr(moe_model, "upcycle_record", None)
    adapter = get_adapter(record["adapter"]) if record else find_adapter(dense_model)
    if inputs is None:
        inputs = adapter.example_inputs(dense_model, generator=torch.Generator().manual_seed(seed))
    elif isinstance(inputs, torch.Tensor):
        inputs = {"x": inputs} if adapter.task == "image_classification" else {"input_ids": inputs}
    modes = moe_model.training, dense_model.training
    moe_model.eval()
    dense_model.eval()
    try:
        reference = adapter.outputs(dense_model, inputs).float()
        converted = adapter.outputs(moe_model, inputs).float()
    finally:
        moe_model.train(modes[0])
        dense_model.train(modes[1])
    if converted.shape != reference.shape:
        raise ValueError(f"output shapes differ: converted {tuple(converted.shape)} vs dense {tuple(reference.shape)}")
    return float((converted - reference).abs().max())
