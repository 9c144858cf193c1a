"""timm XCiT (El-Nouby et al., arXiv 2106.09681): ``blocks[i].mlp`` after the cross-covariance attention and the
local patch interaction, on channels-last tokens ``[b, n, d]``, then the class-attention stage's
``cls_attn_blocks[j].mlp`` (CaiT-style), which runs on the class token alone ``[b, 1, d]``. The local patch
interaction (3×3 depthwise convolutions) mixes neighbouring positions and stays dense.
"""

from __future__ import annotations

from torch import nn

from .base import Adapter, FFNSite, register_adapter
from .dense_ffn import DenseFFN
from .timm_common import TimmAdapterMixin, mlp_kind, read_timm_mlp


@register_adapter
class TimmXCiTAdapter(TimmAdapterMixin, Adapter):
    name = "timm_xcit"
    family = "timm XCiT (blocks[i].mlp, cls_attn_blocks[j].mlp: Mlp)"
    task = "image_classification"

    def matches(self, model: nn.Module) -> bool:
        stacks = [getattr(model, "blocks", None), getattr(model, "cls_attn_blocks", None) or []]
        return (
            type(model).__module__.startswith("timm.")
            and isinstance(stacks[0], nn.ModuleList)
            and len(stacks[0]) > 0
            and all(mlp_kind(getattr(block, "mlp", None)) is not None for stack in stacks for block in stack)
            and hasattr(model, "cls_attn_blocks")
        )

    def ffn_sites(self, model: nn.Module) -> list[FFNSite]:
        names = [f"blocks.{i}.mlp" for i in range(len(model.blocks))]
        names += [f"cls_attn_blocks.{j}.mlp" for j in range(len(model.cls_attn_blocks or []))]
        return [FFNSite(index, name) for index, name in enumerate(names)]

    def read_ffn(self, model: nn.Module, site: FFNSite) -> DenseFFN:
        return read_timm_mlp(model.get_submodule(site.name), site.name)
