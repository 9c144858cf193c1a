"""timm ConvNeXt: ``stages[s].blocks[j].mlp``, an ``Mlp`` with Linear layers on a channels-last grid
``[b, H, W, d]`` (the block permutes), or with 1×1 Conv2d layers on channels-first ``[b, d, H, W]``
(``conv_mlp=True``). Tokens are spatial positions.
"""

from __future__ import annotations

from torch import nn

from ..layers import MoE
from .base import Adapter, FFNSite, MoEFFN, register_adapter, set_submodule
from .dense_ffn import DenseFFN
from .timm_common import TimmAdapterMixin, mlp_kind, read_timm_mlp


@register_adapter
class TimmConvNeXtAdapter(TimmAdapterMixin, Adapter):
    name = "timm_convnext"
    family = "timm ConvNeXt (stages[s].blocks[j].mlp: Linear or 1×1-conv Mlp)"
    task = "image_classification"

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ == "ConvNeXt" and type(model).__module__.startswith("timm.")

    def ffn_sites(self, model: nn.Module) -> list[FFNSite]:
        sites = []
        for s, stage in enumerate(model.stages):
            for j, block in enumerate(stage.blocks):
                if mlp_kind(block.mlp) is None:
                    raise ValueError(
                        f"stages.{s}.blocks.{j}.mlp is a {type(block.mlp).__name__}, not a per-token MLP "
                        "(ConvNeXt-V2's GRN mixes spatial positions)"
                    )
                sites.append(FFNSite(len(sites), f"stages.{s}.blocks.{j}.mlp"))
        return sites

    def read_ffn(self, model: nn.Module, site: FFNSite) -> DenseFFN:
        return read_timm_mlp(model.get_submodule(site.name), site.name)

    def install(self, model: nn.Module, site: FFNSite, moe: MoE) -> None:
        channels_first = isinstance(model.get_submodule(site.name).fc1, nn.Conv2d)
        set_submodule(model, site.name, MoEFFN(moe, channels_first=channels_first))
