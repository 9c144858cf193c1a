"""Hugging Face GPT-NeoX / Pythia (Black et al., arXiv 2204.06745; Biderman et al., arXiv 2304.01373):
``gpt_neox.layers[i].mlp`` with ``dense_h_to_4h`` and ``dense_4h_to_h`` (biased Linear) and ``act`` from
``config.hidden_act``. The parallel residual (``x + attn(ln1(x)) + mlp(ln2(x))``) and partial rotary embeddings
stay GPT-NeoX's own: only the MLP module is replaced.
"""

from __future__ import annotations

from .base import register_adapter
from .hf_common import HFMLPAdapter


@register_adapter
class HFGPTNeoXAdapter(HFMLPAdapter):
    name = "hf_gpt_neox"
    family = "Hugging Face GPT-NeoX / Pythia (layers[i].mlp: dense_h_to_4h, dense_4h_to_h)"
    task = "causal_lm"
    model_types = ("gpt_neox",)
    layers_path, ffn_name, up, down = "layers", "mlp", "dense_h_to_4h", "dense_4h_to_h"
