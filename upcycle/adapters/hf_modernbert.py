"""Hugging Face ModernBERT (Warner et al., arXiv 2412.13663): ``layers[i].mlp`` with ``Wi`` (Linear ``[2h, d]``)
and ``Wo``: ``Wo(drop(act(a) * g))`` where ``a, g = Wi(x).chunk(2)``, so the *first* half is activated (GeGLU).
The dropout on the hidden units (``mlp_dropout``, 0 in the released models) has no MoE counterpart: it is dropped.
"""

from __future__ import annotations

from .base import register_adapter
from .hf_common import HFMLPAdapter


@register_adapter
class HFModernBertAdapter(HFMLPAdapter):
    name = "hf_modernbert"
    family = "Hugging Face ModernBERT encoders (layers[i].mlp: fused Wi, Wo)"
    task = "encoder"
    model_types = ("modernbert",)
    layers_path, ffn_name, fused_gate_up, down = "layers", "mlp", "Wi", "Wo"
