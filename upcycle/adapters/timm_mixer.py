"""timm MLP-Mixer family (Tolstikhin et al., arXiv 2105.01601; ResMLP, arXiv 2105.03404; the GLU "gmixer"):
``blocks[i].mlp_channels``, the channel MLP, is the FFN, on channels-last tokens ``[b, n, d]``.

Each block also has a token-mixing layer (Mixer's ``mlp_tokens``, ResMLP's ``linear_tokens``) applied to the
transposed sequence ``[b, d, n]``: it mixes the n patches of each channel, so it is not an FFN over a token's
channels and stays dense. gMLP's channel MLP holds a spatial gating unit (it mixes tokens inside the MLP) and is
refused (see ``timm_refusal``).
"""

from __future__ import annotations

from torch import nn

from .base import Adapter, FFNSite, register_adapter
from .dense_ffn import DenseFFN
from .timm_common import TimmAdapterMixin, mlp_kind, read_timm_mlp


@register_adapter
class TimmMixerAdapter(TimmAdapterMixin, Adapter):
    name = "timm_mixer"
    family = "timm MLP-Mixer / ResMLP (blocks[i].mlp_channels; the token-mixing MLP stays dense)"
    task = "image_classification"

    def matches(self, model: nn.Module) -> bool:
        blocks = getattr(model, "blocks", None)
        return (
            type(model).__module__.startswith("timm.")
            and isinstance(blocks, nn.Sequential)
            and len(blocks) > 0
            and all(mlp_kind(getattr(block, "mlp_channels", None)) is not None for block in blocks)
        )

    def ffn_sites(self, model: nn.Module) -> list[FFNSite]:
        return [FFNSite(i, f"blocks.{i}.mlp_channels") for i in range(len(model.blocks))]

    def read_ffn(self, model: nn.Module, site: FFNSite) -> DenseFFN:
        return read_timm_mlp(model.get_submodule(site.name), site.name)
