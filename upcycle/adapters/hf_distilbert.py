"""Hugging Face DistilBERT (Sanh et al., arXiv 1910.01108): ``transformer.layer[i].ffn`` with ``lin1``, ``lin2``
(biased Linear), ``activation`` from ``config.activation`` and output dropout ``config.dropout``; the residual and
``output_layer_norm`` sit outside the FFN module and stay.
"""

from __future__ import annotations

from .base import register_adapter
from .hf_common import HFMLPAdapter


@register_adapter
class HFDistilBertAdapter(HFMLPAdapter):
    name = "hf_distilbert"
    family = "Hugging Face DistilBERT encoders (transformer.layer[i].ffn: lin1, lin2)"
    task = "encoder"
    activation_attribute = "activation"
    model_types = ("distilbert",)
    layers_path, ffn_name, up, down, dropout_key = "transformer.layer", "ffn", "lin1", "lin2", "dropout"
