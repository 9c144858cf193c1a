"""Hugging Face GPT-2: ``h[i].mlp`` with ``c_fc`` and ``c_proj`` as ``Conv1D`` (weights stored transposed,
``[in, out]``), activation ``config.activation_function`` (``gelu_new`` = tanh GELU) and residual dropout.
"""

from __future__ import annotations

from .base import register_adapter
from .hf_common import HFMLPAdapter


@register_adapter
class HFGPT2Adapter(HFMLPAdapter):
    name = "hf_gpt2"
    family = "Hugging Face GPT-2 (h[i].mlp: Conv1D c_fc, c_proj)"
    task = "causal_lm"
    model_types = ("gpt2",)
    layers_path, ffn_name, up, down, dropout_key = "h", "mlp", "c_fc", "c_proj", "resid_pdrop"
