"""Hugging Face Phi-3 (Abdin et al., arXiv 2404.14219) and models with its fused MLP: ``layers[i].mlp`` with
``gate_up_proj`` (Linear ``[2h, d]``, the gate half first) and ``down_proj``:
``down(act(gate) * up)`` where ``gate, up = gate_up_proj(x).chunk(2)``. The fused qkv projection stays Phi-3's own.
"""

from __future__ import annotations

from .base import register_adapter
from .hf_common import HFMLPAdapter


@register_adapter
class HFPhi3Adapter(HFMLPAdapter):
    name = "hf_phi3"
    family = "Hugging Face Phi-3 (layers[i].mlp: fused gate_up_proj, down_proj)"
    task = "causal_lm"
    activation_attribute = "activation_fn"
    layers_path, ffn_name, fused_gate_up, down = "layers", "mlp", "gate_up_proj", "down_proj"
