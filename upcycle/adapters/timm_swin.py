"""timm Swin Transformer (Liu et al., arXiv 2103.14030) and Swin V2 (arXiv 2111.09883): ``layers[s].blocks[j].mlp``,
a timm ``Mlp`` after the (shifted-)window attention. The block flattens its window grid before the MLP, so tokens
are channels-last ``[b, H·W, d]``; the width doubles at every stage's patch merging. V2's post-norm wraps the MLP's
output (``norm2(mlp(x))``) and stays outside the MoE, as its attention's continuous position-bias MLP (``cpb_mlp``,
a bias generator, not a token FFN) stays dense.
"""

from __future__ import annotations

from torch import nn

from .base import Adapter, FFNSite, register_adapter
from .dense_ffn import DenseFFN
from .timm_common import TimmAdapterMixin, mlp_kind, read_timm_mlp


@register_adapter
class TimmSwinAdapter(TimmAdapterMixin, Adapter):
    name = "timm_swin"
    family = "timm Swin / Swin V2 (layers[s].blocks[j].mlp: Mlp)"
    task = "image_classification"

    def matches(self, model: nn.Module) -> bool:
        layers = getattr(model, "layers", None)
        return (
            type(model).__module__.startswith("timm.")
            and isinstance(layers, nn.Sequential)
            and len(layers) > 0
            and all(
                isinstance(getattr(stage, "blocks", None), nn.Sequential | nn.ModuleList)
                and all(mlp_kind(getattr(block, "mlp", None)) is not None for block in stage.blocks)
                for stage in layers
            )
        )

    def ffn_sites(self, model: nn.Module) -> list[FFNSite]:
        names = [f"layers.{s}.blocks.{j}.mlp" for s, stage in enumerate(model.layers) for j in range(len(stage.blocks))]
        return [FFNSite(index, name) for index, name in enumerate(names)]

    def read_ffn(self, model: nn.Module, site: FFNSite) -> DenseFFN:
        return read_timm_mlp(model.get_submodule(site.name), site.name)
